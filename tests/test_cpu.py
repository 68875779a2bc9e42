"""rlhfkit.cpu: the thread count a run uses stays within the CPUs it may use."""

from __future__ import annotations

import logging

import torch

from rlhfkit.cpu import ThreadChoice, cap_threads, configure_threads, usable_cpus


def test_more_threads_than_cpus_are_capped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="rlhfkit.cpu"):
        assert cap_threads(ThreadChoice(100000, "--threads"), cpus=4).threads == 4
    assert "--threads asks for 100000 CPU threads, but this process may use 4 logical CPU(s); using 4" in caplog.text
    caplog.clear()
    assert cap_threads(ThreadChoice(3, "--threads"), cpus=4) == ThreadChoice(3, "--threads")
    assert not caplog.records


def test_configure_threads_100000_uses_the_usable_cpus(caplog, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.WARNING, logger="rlhfkit.cpu"):
            choice = configure_threads(100000)
        assert choice.threads == usable_cpus() == torch.get_num_threads()
        assert "asks for 100000 CPU threads" in caplog.text
    finally:
        torch.set_num_threads(before)


def test_omp_num_threads_too_large_is_capped_too(caplog, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "100000")
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.WARNING, logger="rlhfkit.cpu"):
            assert configure_threads(None).threads == usable_cpus()
        assert "OMP_NUM_THREADS asks for 100000" in caplog.text
    finally:
        torch.set_num_threads(before)

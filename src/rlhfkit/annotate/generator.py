"""Where the K responses come from, and the background thread that makes them ahead of time.

A generator is anything with a ``name`` (stored with each generation set) and
``generate(prompt, k) -> list[str]``. A selector (``annotate --selection uncertainty``:
:class:`~rlhfkit.annotate.selection.UncertaintySelector`) picks K of M sampled candidates and
gives the set a priority, the order the app serves sets in. :class:`ModelGenerator` samples from a causal LM;
tests may pass any object with the same two members.

:class:`Pregenerator` owns the one model: a single thread generates, behind a lock, so
the model is never called concurrently. It serves explicit requests first (an annotator waiting on a
prompt) and otherwise keeps ``prefetch`` untouched pool sets ready, so annotators rarely
wait.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Protocol

import torch

from rlhfkit.annotate.store import AnnotationStore
from rlhfkit.annotate.store import Prompt as StoredPrompt
from rlhfkit.data.prompts import Prompt
from rlhfkit.models.cpu_linear import apply_cpu_matmul
from rlhfkit.models.policy import inference_dtype, load_policy
from rlhfkit.models.tokenizers import use_chat_template
from rlhfkit.sampling import SamplingSettings, sample_texts

logger = logging.getLogger(__name__)


class Generator(Protocol):
    name: str

    def generate(self, prompt: str, k: int) -> list[str]: ...


class Selector(Protocol):
    def select(self, prompt: str, candidates: Sequence[str], k: int) -> tuple[list[int], float]: ...

    def refresh(self) -> int: ...


class GenerationError(RuntimeError):
    pass


class ModelGenerator:
    """Samples K responses from a causal LM (alias, folder or hub id) with the chat template."""

    def __init__(
        self, policy: str, *, max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, cpu: bool = False
    ):
        device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
        self.name = policy
        self.settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        self.model, self.tokenizer = load_policy(policy, device=device, dtype=inference_dtype(None, device))
        apply_cpu_matmul("auto", device, self.model)
        self.chat = use_chat_template(self.tokenizer, None, policy)

    def generate(self, prompt: str, k: int) -> list[str]:
        return sample_texts(self.model, self.tokenizer, [Prompt(prompt)], k, self.settings, chat=self.chat)[0]


class Pregenerator:
    """One background thread that turns prompts into stored generation sets of K responses.

    Every set holds K distinct, non-blank responses (what the preference readers accept):
    duplicates and blanks are re-sampled, up to ``max_attempts`` calls per set. With a
    ``selector``, ``candidates`` (M >= K) are sampled and the selector keeps K of them and sets
    the set's priority.
    """

    def __init__(
        self,
        store: AnnotationStore,
        generator: Generator,
        k: int,
        *,
        prefetch: int = 4,
        max_attempts: int = 5,
        selector: Selector | None = None,
        candidates: int | None = None,
    ):
        self.store = store
        self.generator = generator
        self.k = k
        self.selector = selector
        self.candidates = k if selector is None or candidates is None else candidates
        if self.candidates < k:
            raise ValueError(f"candidates={self.candidates} must be >= k={k}")
        self.prefetch = prefetch
        self.max_attempts = max_attempts
        self._cond = threading.Condition()
        self._pending: list[int] = []  # prompt ids, in order; [0] is being generated
        self._errors: dict[int, str] = {}  # prompt id -> why its last generation failed
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._model_lock = threading.Lock()  # one model: never two generations at once

    # ------------------------------------------------------------ called by request handlers

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rlhfkit-pregenerate", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def request(self, prompt_id: int) -> None:
        """Queue a new set for ``prompt_id`` (no-op while one is already queued)."""
        with self._cond:
            if prompt_id not in self._pending:
                self._errors.pop(prompt_id, None)
                self._pending.append(prompt_id)
                self._cond.notify_all()

    def wait(self, prompt_id: int, timeout: float) -> None:
        """Block until ``prompt_id`` is no longer queued, or ``timeout`` seconds."""
        with self._cond:
            self._cond.wait_for(lambda: prompt_id not in self._pending or self._stopped, timeout=timeout)

    def position(self, prompt_id: int) -> int | None:
        """0 while being generated, n when n sets are ahead of it, None when not queued."""
        with self._cond:
            return self._pending.index(prompt_id) if prompt_id in self._pending else None

    def pop_error(self, prompt_id: int) -> str | None:
        with self._cond:
            return self._errors.pop(prompt_id, None)

    def is_busy(self) -> bool:
        with self._cond:
            return bool(self._pending)

    # ------------------------------------------------------------ the worker thread

    def _next_prefetch(self) -> StoredPrompt | None:
        if self.store.count_untouched_pool_sets() >= self.prefetch:
            return None
        with self._cond:
            skip = set(self._errors)
        candidates = self.store.pool_prompts_without_sets(len(skip) + 1)
        return next((p for p in candidates if p.id not in skip), None)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
                prompt_id = self._pending[0] if self._pending else None
            if prompt_id is None:
                try:
                    prefetch = self._next_prefetch()
                except Exception:  # a broken database must not kill the thread silently
                    logger.exception("pre-generation: could not read the store")
                    prefetch = None
                if prefetch is None:
                    self._refresh_selector()  # idle: re-order the waiting sets if new rankings came in
                with self._cond:
                    if self._pending or self._stopped:  # a request arrived meanwhile: serve it first
                        continue
                    if prefetch is None:
                        # Nothing to do: sleep until a request arrives, then re-check the buffer.
                        self._cond.wait(timeout=1.0)
                        continue
                    self._pending.append(prefetch.id)
                    prompt_id = prefetch.id
            try:
                self.generate_set(prompt_id)
            except Exception as e:
                logger.exception("generation for prompt %d failed", prompt_id)
                with self._cond:
                    self._errors[prompt_id] = f"{type(e).__name__}: {e}"
            with self._cond:
                self._pending.remove(prompt_id)
                self._cond.notify_all()

    def _refresh_selector(self) -> None:
        """Idle: let the selector refit on new rankings and re-order the waiting sets."""
        if self.selector is None:
            return
        try:
            self.selector.refresh()
        except Exception:  # the sets keep their old order; generation goes on
            logger.exception("--selection uncertainty: refitting the ensemble failed")

    def generate_set(self, prompt_id: int) -> int:
        """Generate and store one set of K responses for ``prompt_id``; returns its id."""
        prompt = self.store.get_prompt(prompt_id)
        if prompt is None:
            raise GenerationError(f"prompt {prompt_id} does not exist")
        need = self.candidates
        responses: list[str] = []
        for _ in range(self.max_attempts):
            with self._model_lock:
                texts = self.generator.generate(prompt.text, need - len(responses))
            for text in texts:
                if text.strip() and text not in responses:
                    responses.append(text)
            if len(responses) >= need:
                responses, priority = responses[:need], 0.0
                if self.selector is not None:
                    chosen, priority = self.selector.select(prompt.text, responses, self.k)
                    responses = [responses[i] for i in chosen]
                return self.store.add_generation_set(prompt_id, self.generator.name, responses, priority=priority)
        lower = "--candidates or --samples-per-prompt" if need > self.k else "--samples-per-prompt"
        raise GenerationError(
            f"after {self.max_attempts} attempts the model gave only {len(responses)} distinct non-blank "
            f"responses to prompt {prompt_id} (need {need}); raise --max-new-tokens or the temperature, "
            f"or lower {lower}"
        )

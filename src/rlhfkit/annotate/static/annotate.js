// The annotate page: fetch a generation set, rank it by keyboard or drag and drop, submit.
"use strict";

let task = null;        // {set_id, prompt_id, prompt, responses, k, allow_ties}
let order = [];         // response indices in the current ranking, best first
let tied = new Set();   // response indices tied with the card just above them
let selected = 0;       // position of the selected card
let mode = "next";      // where the next set comes from: "next" (pool order) or "random"
let loadTicket = 0;     // bumped by every load, so an outdated poll loop stops
let busy = false;

const $ = (id) => document.getElementById(id);
const letter = (index) => String.fromCharCode(65 + index);

// ------------------------------------------------------------------ loading

function showOnly(section) {
  for (const id of ["progress", "empty", "task"]) $(id).hidden = id !== section;
}

function showProgress(text) {
  $("progress-text").textContent = text;
  showOnly("progress");
}

async function load(query) {
  const ticket = ++loadTicket;
  const started = Date.now();
  showProgress("Fetching the next prompt…");
  for (;;) {
    let res;
    try {
      res = await api(`/api/next?${query}&wait=2`);
    } catch (error) {
      if (ticket === loadTicket) { showOnly(null); showError(error); }
      return;
    }
    if (ticket !== loadTicket) return;
    if (res.status === 202) {
      const seconds = Math.round((Date.now() - started) / 1000);
      const queue = res.body.queue_position ? ` (${res.body.queue_position} ahead in the queue)` : "";
      const prompt = res.body.prompt.length > 80 ? res.body.prompt.slice(0, 80) + "…" : res.body.prompt;
      showProgress(`Generating responses for “${prompt}”… ${seconds} s${queue}`);
      query = `prompt_id=${res.body.prompt_id}`;
      continue;
    }
    if (res.body.status === "empty") {
      $("empty").textContent = res.body.message;
      showOnly("empty");
      return;
    }
    showTask(res.body);
    return;
  }
}

function showTask(next) {
  task = next;
  order = next.responses.map((_, i) => i);
  tied = new Set();
  selected = 0;
  $("prompt").textContent = next.prompt;
  $("prompt-meta").textContent = `#${next.prompt_id} · set ${next.set_id}`;
  // A set the pipeline pushed belongs to a round of RLHF: say which one.
  const hasRound = next.round !== null && next.round !== undefined;
  $("round-tag").hidden = !hasRound;
  $("round-tag").textContent = hasRound ? `Round ${next.round}` : "";
  $("comment").value = "";
  const keys = next.k <= 9 ? `press 1–${next.k} to move it to that rank, or ` : "";
  $("help").textContent =
    `Select a response (click, Tab or ↑/↓), then ${keys}Shift+↑/↓ to move it one place; or drag it. ` +
    (next.allow_ties ? "= (or the tie button) ties it with the response above. " : "") +
    "Ctrl+Enter submits.";
  showOnly("task");
  render();
  $("responses").children[0].focus();  // keyboard ranking works straight away
}

// ------------------------------------------------------------------ the ranking

function displayRanks() {
  let rank = 0;
  return order.map((index, pos) => (pos > 0 && tied.has(index) ? rank : ++rank));
}

function groups() {
  const result = [];
  order.forEach((index, pos) => {
    if (pos > 0 && tied.has(index)) result[result.length - 1].push(index);
    else result.push([index]);
  });
  return result;
}

function move(from, to) {
  to = Math.max(0, Math.min(order.length - 1, to));
  const [index] = order.splice(from, 1);
  order.splice(to, 0, index);
  tied.delete(index);
  selected = to;
  render();
}

// Selecting only restyles the cards: rebuilding them would cancel a drag that starts on
// an unselected card (mousedown focuses it first).
function select(pos, focus = true) {
  selected = Math.max(0, Math.min(order.length - 1, pos));
  const cards = [...$("responses").children];
  cards.forEach((li, i) => {
    li.classList.toggle("selected", i === selected);
    li.tabIndex = i === selected ? 0 : -1;
  });
  if (focus) cards[selected].focus();
}

function toggleTie(pos) {
  if (!task.allow_ties || pos === 0) return;
  const index = order[pos];
  if (tied.has(index)) tied.delete(index); else tied.add(index);
  selected = pos;
  render();
}

function render() {
  const ranks = displayRanks();
  const cards = order.map((index, pos) => card(index, pos, ranks[pos]));
  $("responses").replaceChildren(...cards);
  if (document.activeElement === document.body || document.activeElement.classList.contains("card")) {
    cards[selected].focus();
  }
}

function card(index, pos, rank) {
  const isTied = pos > 0 && tied.has(index);
  const li = el("li", {
    class: "card" + (pos === selected ? " selected" : "") + (isTied ? " tied" : ""),
    draggable: "true",
    tabindex: pos === selected ? 0 : -1,
    "data-index": index,
    "aria-label": `Rank ${rank}${isTied ? " (tie)" : ""}: response ${letter(index)}`,
  },
    el("span", { class: "rank", text: isTied ? `=${rank}` : String(rank) }),
    el("div", { class: "body" },
      el("div", { class: "label", text: `Response ${letter(index)}` }),
      el("div", { class: "text", text: task.responses[index] })),
    task.allow_ties && pos > 0
      ? el("button", { type: "button", class: "tie", "aria-pressed": isTied ? "true" : "false",
          title: "Tie with the response above (=)", text: "= tie", onclick: (e) => { e.stopPropagation(); toggleTie(pos); } })
      : null);
  li.addEventListener("click", () => select(pos));
  li.addEventListener("focus", () => { if (selected !== pos) select(pos, false); });
  li.addEventListener("dragstart", (e) => {
    e.dataTransfer.setData("text/plain", String(pos));
    e.dataTransfer.effectAllowed = "move";
    li.classList.add("dragging");
  });
  li.addEventListener("dragend", () => li.classList.remove("dragging"));
  li.addEventListener("dragover", (e) => {
    e.preventDefault();
    e.dataTransfer.dropEffect = "move";
    li.classList.add("drop-target");
  });
  li.addEventListener("dragleave", () => li.classList.remove("drop-target"));
  li.addEventListener("drop", (e) => {
    e.preventDefault();
    const from = Number(e.dataTransfer.getData("text/plain"));
    if (Number.isInteger(from) && from !== pos) move(from, pos);
    else li.classList.remove("drop-target");
  });
  return li;
}

// ------------------------------------------------------------------ actions

function setBusy(value) {
  busy = value;
  $("submit").disabled = value;
  $("skip").disabled = value;
}

async function submit() {
  if (!task || busy || $("task").hidden) return;
  setBusy(true);
  const submitted = task;
  try {
    const res = await api("/api/rankings", {
      method: "POST", json: { set_id: task.set_id, ranking: groups(), comment: $("comment").value },
    });
    const id = res.body.id;
    toast(`Saved ranking #${id}.`, "Undo", async () => {
      try {
        await api(`/api/rankings/${id}`, { method: "DELETE" });
        toast(`Ranking #${id} deleted; rank the set again.`);
        load(`prompt_id=${submitted.prompt_id}`);
      } catch (error) { showError(error); }
    });
    load(`mode=${mode}`);
  } catch (error) {
    showError(error);
  } finally {
    setBusy(false);
  }
}

async function skip() {
  if (!task || busy || $("task").hidden) return;
  setBusy(true);
  try {
    await api("/api/skips", { method: "POST", json: { set_id: task.set_id } });
    toast(`Skipped set ${task.set_id}.`);
    load(`mode=${mode}`);
  } catch (error) {
    showError(error);
  } finally {
    setBusy(false);
  }
}

function onKey(e) {
  if (!task || $("task").hidden) return;
  const ctrl = e.ctrlKey || e.metaKey;
  if (e.key === "Enter" && ctrl) { e.preventDefault(); submit(); return; }
  if (e.target.matches("input, textarea, select")) return;
  if (e.key === "ArrowUp" || e.key === "ArrowDown") {
    e.preventDefault();
    const target = selected + (e.key === "ArrowUp" ? -1 : 1);
    if (e.shiftKey || e.altKey) move(selected, target); else select(target);
  } else if (/^[1-9]$/.test(e.key) && !ctrl && !e.altKey && Number(e.key) <= order.length) {
    e.preventDefault();
    move(selected, Number(e.key) - 1);
  } else if (e.key === "=" && task.allow_ties) {
    e.preventDefault();
    toggleTie(selected);
  }
}

initPage(() => {
  $("next-btn").addEventListener("click", () => { mode = "next"; load("mode=next"); });
  $("random-btn").addEventListener("click", () => { mode = "random"; load("mode=random"); });
  $("typed-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = $("typed-prompt").value;
    if (!text.trim()) return;
    try {
      const res = await api("/api/prompts", { method: "POST", json: { text } });
      $("typed-prompt").value = "";
      load(`prompt_id=${res.body.prompt_id}`);
    } catch (error) { showError(error); }
  });
  $("submit").addEventListener("click", submit);
  $("skip").addEventListener("click", skip);
  document.addEventListener("keydown", onKey);
  load("mode=next");
});

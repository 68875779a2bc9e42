// The dataset page: browse saved rankings, delete/undo one's own, export, agreement.
"use strict";

const $ = (id) => document.getElementById(id);
let page = 1;
let me = null;

function filterParams() {
  const params = new URLSearchParams();
  if ($("f-annotator").value) params.set("annotator", $("f-annotator").value);
  if ($("f-prompt").value.trim()) params.set("prompt", $("f-prompt").value.trim());
  if ($("f-prompt-id").value) params.set("prompt_id", $("f-prompt-id").value);
  if ($("f-round").value) params.set("round", $("f-round").value);
  return params;
}

async function loadRows() {
  const params = filterParams();
  params.set("page", String(page));
  params.set("per_page", "20");
  if ($("f-deleted").checked) params.set("deleted", "true");
  let data;
  try { data = (await api(`/api/rankings?${params}`)).body; } catch (error) { showError(error); return; }
  if (page > data.pages) { page = data.pages; return loadRows(); }
  $("page-info").textContent = `Page ${data.page} of ${data.pages} · ${data.total} ranking${data.total === 1 ? "" : "s"}`;
  $("prev").disabled = data.page <= 1;
  $("next").disabled = data.page >= data.pages;
  $("rows").replaceChildren(...(data.items.length ? data.items.map(row) : [el("li", { class: "muted", text: "No rankings match." })]));
}

function row(item) {
  const ranked = el("ol", { class: "ranked" });
  item.ranking.forEach((group, rank) => {
    for (const index of group) {
      ranked.append(el("li", { class: group.length > 1 ? "tied" : null },
        el("span", { class: "rank", text: group.length > 1 ? `=${rank + 1}` : String(rank + 1) }),
        el("span", { class: "text", text: item.responses[index] })));
    }
  });
  const actions = el("div", { class: "actions" });
  if (item.can_edit && !item.deleted) {
    actions.append(el("button", { type: "button", text: "Delete", onclick: () => remove(item.id) }));
  } else if (item.can_edit) {
    actions.append(el("button", { type: "button", text: "Restore", onclick: () => restore(item.id) }));
  }
  return el("li", { class: "row", "data-id": item.id },
    el("div", { class: "meta" },
      el("span", { text:
        `#${item.id} · ${item.annotator} · ${item.created_at.replace("T", " ").slice(0, 19)} · prompt #${item.prompt_id}, set ${item.set_id}` +
        (item.updated_at ? " · edited" : "") }),
      item.round !== null && item.round !== undefined ? el("span", { class: "tag", text: `Round ${item.round}` }) : null),
    el("div", { class: "prompt", text: item.prompt }),
    ranked,
    item.comment ? el("p", { class: "comment", text: `Comment: ${item.comment}` }) : null,
    actions);
}

async function remove(id) {
  try {
    await api(`/api/rankings/${id}`, { method: "DELETE" });
    toast(`Ranking #${id} deleted.`, "Undo", () => restore(id));
    refresh();
  } catch (error) { showError(error); }
}

async function restore(id) {
  try {
    await api(`/api/rankings/${id}/restore`, { method: "POST" });
    toast(`Ranking #${id} restored.`);
    refresh();
  } catch (error) { showError(error); }
}

function percent(x) { return x === null ? "–" : `${(100 * x).toFixed(1)}%`; }
function fixed(x) { return x === null ? "–" : x.toFixed(3); }

async function loadStats() {
  let stats;
  try { stats = (await api("/api/stats")).body; } catch (error) { showError(error); return; }
  // Admins get every annotator's row; an annotator gets their own row and the totals, no names.
  const total = stats.totals;
  $("counts").tBodies[0].replaceChildren(...stats.annotators.map((a) => el("tr", {},
    el("td", { text: a.is_admin ? `${a.annotator} (admin)` : a.annotator }),
    el("td", { text: String(a.rankings) }), el("td", { text: String(a.skips) }))),
  el("tr", { class: "total" }, el("td", { text: `All ${total.annotators} annotator(s)` }),
    el("td", { text: String(total.rankings) }), el("td", { text: String(total.skips) })));
  const overall = stats.agreement.overall;
  $("agreement-overall").textContent = (overall.shared_sets
    ? `${overall.shared_sets} set(s) ranked by two or more annotators; overall pairwise agreement ` +
      `${percent(overall.pairwise_agreement)}, Kendall τ ${fixed(overall.kendall_tau)}; ` +
      `mean Kendall τ of an annotator with the consensus of the others ${fixed(overall.consensus_tau)}.`
    : "No set has been ranked by two annotators yet.") +
    (me.is_admin ? "" : " Per-annotator figures are shown to admins.");
  $("agreement").hidden = !stats.agreement.pairs.length;
  $("agreement").tBodies[0].replaceChildren(...stats.agreement.pairs.map((p) => el("tr", {},
    el("td", { text: p.annotator_a }), el("td", { text: p.annotator_b }), el("td", { text: String(p.shared_sets) }),
    el("td", { text: percent(p.pairwise_agreement) }), el("td", { text: fixed(p.kendall_tau) }))));
  // Each annotator against the consensus of the others (admins only: the list is empty for annotators).
  $("consensus-section").hidden = !stats.agreement.consensus.length;
  $("consensus").tBodies[0].replaceChildren(...stats.agreement.consensus.map((c) => el("tr", {},
    el("td", { text: c.annotator }), el("td", { text: String(c.consensus_sets) }), el("td", { text: fixed(c.consensus_tau) }))));
  const select = $("f-annotator");
  if (select.options.length === 1) {
    const names = me.is_admin ? stats.annotators.map((a) => a.annotator) : [me.name];
    for (const name of names) select.append(el("option", { value: name, text: name }));
  }
}

function refresh() { loadRows(); loadStats(); }

async function exportAs(format) {
  const params = filterParams();
  params.set("format", format);
  try {
    const response = await api(`/api/export?${params}`, { raw: true });
    const url = URL.createObjectURL(await response.blob());
    const link = el("a", { href: url, download: `annotations.${format}` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  } catch (error) { showError(error); }
}

initPage((user) => {
  me = user;
  $("filters").addEventListener("submit", (e) => { e.preventDefault(); page = 1; loadRows(); });
  $("prev").addEventListener("click", () => { page -= 1; loadRows(); });
  $("next").addEventListener("click", () => { page += 1; loadRows(); });
  $("export-tsv").addEventListener("click", () => exportAs("tsv"));
  $("export-jsonl").addEventListener("click", () => exportAs("jsonl"));
  refresh();
});

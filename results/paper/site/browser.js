"use strict";
// The index table: rows from the inline JSON, sorted by a clicked column, filtered by the controls.
(function () {
  const rows = JSON.parse(document.getElementById("features-data").textContent);
  const body = document.querySelector("#features tbody");
  const controls = ["filter", "method", "kind", "cls"].map((id) => document.getElementById(id));
  let key = null, dir = 1;  // null: the books' order until a column is clicked
  const text = (r) => [r.id, r.method, r.notebook, r.kind, r.category, r.cls].join(" ").toLowerCase();
  const cmp = (a, b) => (a === null) - (b === null) || (a < b ? -1 : a > b ? 1 : 0);
  function cell(tr, value, href) {
    const td = tr.insertCell();
    const shown = value === null ? "–" : typeof value === "number" && !Number.isInteger(value) ? value.toFixed(2) : String(value);
    if (href) { const a = document.createElement("a"); a.href = href; a.textContent = shown; td.appendChild(a); }
    else td.textContent = shown;
  }
  function render() {
    const [q, method, kind, cls] = controls.map((c) => c.value);
    const shown = rows.filter((r) => (!q || text(r).includes(q.toLowerCase())) && (!method || r.method === method)
      && (!kind || r.kind === kind) && (!cls || String(r.cls) === cls));
    if (key !== null) shown.sort((a, b) => dir * cmp(a[key], b[key]));
    body.replaceChildren();
    for (const r of shown) {
      const tr = body.insertRow();
      tr.className = "feature";
      cell(tr, r.id, r.page);
      for (const k of ["method", "kind", "category", "strength", "cls", "formation", "matches"]) cell(tr, r[k]);
    }
    document.getElementById("count").textContent = shown.length + " of " + rows.length + " features";
    for (const th of document.querySelectorAll("#features th")) th.className = th.dataset.key === key ? "sorted-" + dir : "";
  }
  for (const th of document.querySelectorAll("#features th")) {
    const sort = () => { dir = th.dataset.key === key ? -dir : 1; key = th.dataset.key; render(); };
    th.addEventListener("click", sort);
    th.addEventListener("keydown", (ev) => { if (ev.key === "Enter") sort(); });
  }
  for (const c of controls) c.addEventListener("input", render);
  render();
})();

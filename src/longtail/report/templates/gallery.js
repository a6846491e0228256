// The gallery's grid: filters, sort and page size come from the URL fragment (#class=coat&sort=signal);
// a change of the form writes the fragment, and every fragment change redraws. No dependencies.
(() => {
  "use strict";
  const data = JSON.parse(document.getElementById("rows").textContent);
  const col = {};
  data.columns.forEach((k, i) => { col[k] = i; });
  const form = document.getElementById("controls"), grid = document.getElementById("grid");
  const info = document.getElementById("info"), more = document.getElementById("more");
  const NAMED = { class: (r) => data.classes[r[col.class]], condition: (r) => data.conditions[r[col.condition]][0] };
  let hits = [], shown = 0, page = 200, lazy = true;

  const num = (v, d) => (v == null ? "–" : v.toFixed(d));
  const test = (k, v) => (NAMED[k] ? (r) => NAMED[k](r) === v : (r) => r[col[k]] === Number(v));

  function render() {
    const s = new URLSearchParams(location.hash.slice(1));
    for (const el of form.elements) if (el.name) el.value = s.get(el.name) || el.options[0].value;
    const want = ["class", "condition", "seed", "round", "weight"].filter((k) => s.get(k)).map((k) => test(k, s.get(k)));
    hits = data.rows.filter((r) => want.every((t) => t(r)));
    const key = s.get("sort") || data.sorts[0], up = s.get("order") === "asc", i = col[key];
    if (data.sorts.includes(key)) {  // missing values last; ties keep manifest order (a stable sort)
      hits.sort((a, b) => (a[i] == null || b[i] == null ? (a[i] == null) - (b[i] == null) : up ? a[i] - b[i] : b[i] - a[i]));
    }
    page = Math.max(1, parseInt(s.get("n"), 10) || 200);
    lazy = s.get("lazy") !== "0";
    grid.textContent = "";
    shown = 0;
    add();
  }

  function add() {
    const end = Math.min(hits.length, shown + page), part = document.createDocumentFragment();
    for (; shown < end; shown++) part.append(card(hits[shown]));
    grid.append(part);
    info.textContent = `${hits.length} of ${data.rows.length} images match; showing ${shown}`;
    more.hidden = shown >= hits.length;
  }

  function card(r) {
    const fig = document.createElement("figure"), img = document.createElement("img");
    const cap = document.createElement("figcaption");
    const line = (text, cls) => {
      const d = cap.appendChild(document.createElement("div"));
      d.textContent = text;
      if (cls) d.className = cls;
    };
    fig.dataset.id = r[col.id];
    if (lazy) img.loading = "lazy";
    img.onload = () => {
      fig.dataset.state = "loaded";
      if (img.naturalWidth < 96) img.className = "px";  // small images: sharp pixels, not blur
    };
    img.onerror = () => { fig.dataset.state = "error"; };
    img.alt = r[col.id];
    img.title = `${r[col.id]}\n${r[col.path]}` + (r[col.image_seed] == null ? "" : `\nnoise seed ${r[col.image_seed]}`);
    img.src = data.stores[r[col.store]] + r[col.path];
    const cls = r[col.class], pred = r[col.pred];
    line(NAMED.class(r), "c");
    line(data.conditions[r[col.condition]][1]);
    const at = [["seed ", r[col.seed]], ["round ", r[col.round]], ["w ", r[col.weight]]];
    line(at.filter((p) => p[1] != null).map((p) => p[0] + p[1]).join(" · "));
    line(`${data.signals[r[col.signal_name]] || "signal"} ${num(r[col.signal], 3)} · P ${num(r[col.p_class], 3)}`);
    if (pred != null && pred !== cls) line(`classified ${data.classes[pred] || pred}`, "bad");
    fig.append(img, cap);
    return fig;
  }

  form.addEventListener("change", () => {
    const s = new URLSearchParams(location.hash.slice(1)), keep = new URLSearchParams();
    for (const k of ["n", "lazy"]) if (s.has(k)) keep.set(k, s.get(k));
    for (const el of form.elements) if (el.name && el.value) keep.set(el.name, el.value);
    location.hash = keep.toString();
  });
  more.addEventListener("click", add);
  addEventListener("hashchange", render);
  render();
})();

// Batch LoRA Loader rows in the ComfyUI frontend. Each row is one widget named lora_N whose value is the plain
// object the node receives in API prompts: {on, lora, strength_model, strength_clip}. The UI edits exactly that
// value, so a workflow saved here and its API export carry the same rows.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODE = "BatchLoraLoader";
const ROW_H = 24;
const isRow = (v) => v && typeof v === "object" && "lora" in v;
let loading = null; // a copy of the API prompt app.loadApiJson is loading, while it runs (see setup)
let loads = Promise.resolve(); // the loadApiJson calls, one after the other
const TIPS = {
  row: "One LoRA. Click the dot to turn it on/off, the name to pick another file from models/loras, the first " +
    "number for strength_model (UNet), the second for strength_clip (text encoder), \u2715 to remove the row.",
  add: "Pick a LoRA file from models/loras and add it as a new row.",
  all: "Turn every row on, or off when all are on.",
};

async function loraNames() {
  const res = await api.fetchApi("/models/loras");
  return res.ok ? await res.json() : [];
}

function fmt(x) {
  return Number(x).toFixed(2);
}

function rowWidget(name, value) {
  // Click zones, left to right: [on/off] [LoRA name ...] [model strength] [clip strength] [x]
  return {
    name,
    type: "batch_lora_row",
    tooltip: TIPS.row,
    value: { on: true, lora: null, strength_model: 1.0, strength_clip: 1.0, ...value },
    options: {},
    zones: {},
    computeSize(width) {
      return [width, ROW_H];
    },
    draw(ctx, node, width, y, h) {
      const v = this.value;
      const m = 10, sw = 46;
      const z = (this.zones = {
        on: [m, m + 18],
        name: [m + 24, width - m - 2 * sw - 30],
        sm: [width - m - 2 * sw - 24, width - m - sw - 24],
        sc: [width - m - sw - 20, width - m - 20],
        del: [width - m - 16, width - m],
      });
      ctx.save();
      ctx.fillStyle = "#222";
      ctx.beginPath();
      ctx.roundRect(m, y + 2, width - 2 * m, h - 4, 6);
      ctx.fill();
      ctx.globalAlpha = v.on ? 1 : 0.45;
      ctx.fillStyle = v.on ? "#6a6" : "#555";
      ctx.beginPath();
      ctx.arc(z.on[0] + 9, y + h / 2, 6, 0, Math.PI * 2);
      ctx.fill();
      ctx.fillStyle = "#ddd";
      ctx.font = "12px sans-serif";
      ctx.textBaseline = "middle";
      const label = v.lora || "(pick a LoRA)";
      ctx.save();
      ctx.beginPath();
      ctx.rect(z.name[0], y, z.name[1] - z.name[0], h);
      ctx.clip();
      ctx.fillText(label, z.name[0], y + h / 2);
      ctx.restore();
      ctx.textAlign = "center";
      ctx.fillStyle = "#aac";
      ctx.fillText(fmt(v.strength_model), (z.sm[0] + z.sm[1]) / 2, y + h / 2);
      ctx.fillStyle = "#caa";
      ctx.fillText(fmt(v.strength_clip), (z.sc[0] + z.sc[1]) / 2, y + h / 2);
      ctx.fillStyle = "#999";
      ctx.fillText("\u2715", (z.del[0] + z.del[1]) / 2, y + h / 2);
      ctx.restore();
    },
    mouse(event, pos, node) {
      if (event.type !== "pointerdown" && event.type !== "mousedown") return false;
      const x = pos[0];
      const hit = (k) => this.zones[k] && x >= this.zones[k][0] && x <= this.zones[k][1];
      const v = this.value;
      if (hit("on")) v.on = !v.on;
      else if (hit("del")) removeRow(node, this);
      else if (hit("name")) pickLora(event, (name) => { v.lora = name; redraw(node); });
      else if (hit("sm") || hit("sc")) {
        const key = hit("sm") ? "strength_model" : "strength_clip";
        // prompt() places its box on LGraphCanvas.active_canvas, the graph canvas that last had a pointer event. In
        // Nodes 2.0 a row click reaches only the row's own canvas, so in 1.49.6 there may be none yet (it throws).
        LiteGraph.LGraphCanvas.active_canvas ??= app.canvas;
        app.canvas.prompt(key, v[key], (text) => {
          const n = Number(text);
          if (Number.isFinite(n)) v[key] = n;
          redraw(node);
        }, event);
      } else return false;
      redraw(node);
      return true;
    },
    serializeValue() {
      return { ...this.value };
    },
  };
}

// The LoRA picker: a small menu of the pack's own, built from DOM nodes, each file name set as textContent (never as
// HTML). It replaces LiteGraph.ContextMenu, whose addItem sets each entry's innerHTML from the string in frontend
// 1.32.9, so a file in models/loras named like `<img src=x onerror=...>.safetensors` ran script when the menu opened;
// 1.49.6 and 1.58.1 set textContent instead, so escaping the names would show "&lt;..." there. One picker at a time.
let picker = null; // the open picker's close function
// Where a pointer last went down: the picker opens there when it gets no event, as from Nodes 2.0's button element,
// which calls the widget's callback without one (1.49.6, 1.58.1).
let pointer = { clientX: 0, clientY: 0 };
window.addEventListener("pointerdown", (e) => (pointer = e), true);

const PICKER_CSS = `
.batch-lora-picker { position: fixed; z-index: 10000; display: flex; flex-direction: column; gap: 4px; padding: 4px;
  min-width: 220px; max-width: min(480px, 90vw); max-height: min(420px, 80vh); box-sizing: border-box;
  background: var(--comfy-menu-bg, #353535); color: var(--fg-color, #fff); font: 13px sans-serif;
  border: 1px solid var(--border-color, #4e4e4e); border-radius: 6px; box-shadow: 0 4px 16px rgba(0, 0, 0, 0.5); }
.batch-lora-picker input { background: var(--comfy-input-bg, #222); color: inherit; font: inherit; outline: none;
  border: 1px solid var(--border-color, #4e4e4e); border-radius: 4px; padding: 4px 6px; }
.batch-lora-picker [role=listbox] { overflow-y: auto; }
.batch-lora-picker [role=option] { padding: 3px 6px; border-radius: 4px; cursor: pointer; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; }
.batch-lora-picker [role=option]:hover, .batch-lora-picker [role=option].first {
  background: var(--comfy-menu-secondary-bg, #292929); }
.batch-lora-picker .empty { padding: 3px 6px; color: var(--descrip-text, #999); }`;

async function pickLora(event, done) {
  const at = Number.isFinite(event?.clientX) ? event : pointer;
  const names = await loraNames();
  picker?.();
  if (!document.getElementById("batch-lora-picker-css")) {
    const css = document.head.appendChild(document.createElement("style"));
    css.id = "batch-lora-picker-css";
    css.textContent = PICKER_CSS;
  }
  const el = (tag, props, parent) => parent.appendChild(Object.assign(document.createElement(tag), props));
  const root = el("div", { className: "batch-lora-picker" }, document.body);
  const filter = el("input", { type: "text", placeholder: "Filter LoRAs", spellcheck: false }, root);
  const list = el("div", { role: "listbox" }, root);
  const entries = names.map((name) => {
    const e = el("div", { role: "option", textContent: name, title: name }, list); // title: long names in full
    e.addEventListener("click", () => pick(name));
    return e;
  });
  const empty = el("div", { className: "empty" }, list);
  const shown = () => entries.filter((e) => !e.hidden);
  const update = () => {
    const q = filter.value.trim().toLowerCase();
    entries.forEach((e, i) => (e.hidden = !names[i].toLowerCase().includes(q)));
    entries.forEach((e) => e.classList.remove("first"));
    shown()[0]?.classList.add("first"); // what Enter picks
    empty.textContent = names.length ? "(no match)" : "(no LoRA files in models/loras)";
    empty.hidden = shown().length > 0;
  };
  const close = () => {
    window.removeEventListener("pointerdown", outside, true);
    window.removeEventListener("keydown", escape, true);
    root.remove();
    if (picker === close) picker = null;
  };
  const pick = (name) => {
    close();
    done(name);
  };
  const outside = (e) => root.contains(e.target) || close();
  const escape = (e) => e.key === "Escape" && close(); // also when the focus is elsewhere
  filter.addEventListener("input", update);
  root.addEventListener("keydown", (e) => {
    e.stopPropagation(); // typing here is no shortcut of the frontend's (its keybindings listen on window, document)
    if (e.key === "Enter") {
      e.preventDefault();
      const first = shown()[0];
      if (first) pick(names[entries.indexOf(first)]);
    }
  });
  window.addEventListener("pointerdown", outside, true);
  window.addEventListener("keydown", escape, true);
  picker = close;
  update();
  // At the click, moved back inside the window where it would stick out.
  const r = root.getBoundingClientRect();
  root.style.left = `${Math.max(0, Math.min(at.clientX, window.innerWidth - r.width - 4))}px`;
  root.style.top = `${Math.max(0, Math.min(at.clientY, window.innerHeight - r.height - 4))}px`;
  filter.focus();
}

function rows(node) {
  return (node.widgets || []).filter((w) => w.type === "batch_lora_row");
}

function redraw(node) {
  // Nodes 2.0 (Vue nodes) draws each row on a canvas of its own, which it repaints only on widget.triggerDraw()
  // (1.49.6, 1.58.1); the classic graph canvas repaints after setDirtyCanvas.
  for (const w of rows(node)) w.triggerDraw?.();
  node.setDirtyCanvas(true, true);
}

function fit(node) {
  node.setSize([node.size[0], node.computeSize()[1]]);
  redraw(node);
}

function addRow(node, value) {
  // addCustomWidget returns the widget the node keeps (in 1.58.1 one of the frontend's own widget class).
  const w = node.addCustomWidget(rowWidget(`lora_${rows(node).length + 1}`, value));
  // Keep rows before the buttons so widgets_values stays [row, row, ...].
  node.widgets = [...rows(node), ...node.widgets.filter((x) => x.type !== "batch_lora_row")];
  fit(node);
  return w;
}

function removeRow(node, w) {
  // Rows keep their names: Nodes 2.0 binds each row's canvas to the widget of that name once, when it mounts
  // (1.49.6, 1.58.1), so renamed rows would show stale values. Instead the values below the removed row move up one
  // and the last row goes.
  const rs = rows(node);
  for (let i = rs.indexOf(w); i < rs.length - 1; i++) rs[i].value = rs[i + 1].value;
  node.removeWidget(rs[rs.length - 1]);
  fit(node);
}

app.registerExtension({
  name: "comfyui-batch-lora.BatchLoraLoader",
  setup() {
    // An API-format JSON dropped on the canvas goes through app.loadApiJson, which creates the nodes and then sets
    // each input only on a widget of that name that already exists. Rows exist per entry, so each loader makes its
    // rows as it is added to the graph (onAdded, below), from `loading`. loadApiJson is synchronous in 1.32.9, awaits
    // before it creates the nodes in 1.49.6, and also waits behind other graph loads in 1.58.1: so the calls are
    // chained here, and `loading` is the prompt of the one call running until it has finished, whatever the version.
    const loadApiJson = app.loadApiJson;
    app.loadApiJson = function (prompt, ...rest) {
      const run = async () => {
        loading = structuredClone(prompt); // onAdded puts the rows' own values into it: the caller's stays as it is
        try {
          return await loadApiJson.call(this, loading, ...rest);
        } finally {
          loading = null;
        }
      };
      const done = loads.then(run);
      loads = done.catch(() => {});
      return done;
    };
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      const add = this.addWidget("button", "+ Add LoRA", null, (w, canvas, node, pos, event) => {
        pickLora(event, (name) => addRow(this, { lora: name }));
      });
      add.options.serialize = false;
      add.tooltip = TIPS.add;
      const all = this.addWidget("button", "Toggle all", null, () => {
        const rs = rows(this);
        const on = !rs.every((w) => w.value.on);
        rs.forEach((w) => (w.value.on = on));
        redraw(this);
      });
      all.options.serialize = false;
      all.tooltip = TIPS.all;
      this.setSize([Math.max(this.size[0], 400), this.size[1]]); // room for file names and both strengths
      return r;
    };
    const onAdded = nodeType.prototype.onAdded;
    nodeType.prototype.onAdded = function () {
      const r = onAdded?.apply(this, arguments);
      const entry = loading?.[this.id];
      const inputs = entry?.class_type === NODE ? entry.inputs ?? {} : {};
      const names = Object.keys(inputs).filter((k) => /^lora_\d+$/.test(k) && isRow(inputs[k]));
      names.sort((a, b) => a.slice(5) - b.slice(5));
      // The entry becomes the row's own value (defaults filled in), which loadApiJson then assigns to the row.
      for (const k of names) inputs[k] = addRow(this, inputs[k]).value;
      return r;
    };
    const configure = nodeType.prototype.configure;
    nodeType.prototype.configure = function (info) {
      // Rebuild the rows from the saved values before LiteGraph assigns widgets_values by index.
      for (const w of rows(this)) this.removeWidget(w);
      for (const v of info.widgets_values || []) if (isRow(v)) addRow(this, v);
      return configure.apply(this, arguments);
    };
  },
});

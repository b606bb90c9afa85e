// Batch LoRA Loader rows in the ComfyUI frontend. Each row is one widget named lora_N whose value is the plain
// object the node receives in API prompts: {on, lora, strength_model, strength_clip}, plus "blocks" (block weights)
// only when the user set it and "missing" on a row loaded from a saved stack whose file is not in models/loras. The
// UI edits exactly that value, so a workflow saved here and its API export carry the same rows.
// Also here: the LoRA picker with a preview/trigger-word panel (GET /batch_lora/info, nodes/info.py), the same card
// when the pointer rests on a row's file name, and saved stacks (ComfyUI's user-data API, batch_lora/stacks/).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODE = "BatchLoraLoader";
const ROW_H = 24;
const isRow = (v) => v && typeof v === "object" && "lora" in v;
let loading = null; // a copy of the API prompt app.loadApiJson is loading, while it runs (see setup)
let loads = Promise.resolve(); // the loadApiJson calls, one after the other
const TIPS = {
  row: "One LoRA. Click the dot to turn it on/off, the name to pick another file from models/loras (rest the " +
    "pointer on it for its preview and trigger words), \"blocks\" for block weights (a preset such as SD-INALL, " +
    "or comma-separated weights, one per block; empty clears them), the first number for strength_model (UNet), " +
    "the second for strength_clip (text encoder), \u2715 to remove the row.",
  // Per zone of a row in classic mode: the graph canvas shows the tooltip of the widget under the pointer when it
  // rests, read then. Nodes 2.0 shows the row's tooltip as it was when the row mounted (TIPS.row).
  on: "Turn this LoRA on or off.",
  pick: "Click to pick a LoRA file from models/loras.",
  name: "", // the LoRA's own card shows instead (hoverCard)
  blocks: "Block weights, click to edit: a preset name (e.g. SD-INALL, SDXL-OUTALL) or one weight per block, " +
    "comma-separated (e.g. 1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1), optionally after a label and a colon (MINE:1,0,...). " +
    "Empty clears them (every weight 1).",
  sm: "strength_model: the LoRA's strength on the diffusion model (UNet). Click to type a number.",
  sc: "strength_clip: its strength on the text encoder. Click to type a number.",
  del: "Remove this row.",
  add: "Pick a LoRA file from models/loras and add it as a new row.",
  all: "Turn every row on, or off when all are on.",
  stacks: "Save this node's rows under a name, or load a saved stack (it replaces the rows). Stacks are files in " +
    "the ComfyUI user folder, batch_lora/stacks/<name>.json.",
};

async function loraNames() {
  const res = await api.fetchApi("/models/loras");
  return res.ok ? await res.json() : [];
}

function fmt(x) {
  return Number(x).toFixed(2);
}

// A row's value: the defaults, then `value`; "blocks" only when set, "missing" only when true (contract: a row
// without block weights serializes as {on, lora, strength_model, strength_clip}, as before).
function rowValue(value) {
  const v = { on: true, lora: null, strength_model: 1.0, strength_clip: 1.0, ...value };
  if (v.blocks == null || v.blocks === "") delete v.blocks;
  if (v.missing !== true) delete v.missing;
  return v;
}

// `text` drawn in the zone [x0, x1] at height y, cut at its right edge.
function clipped(ctx, text, [x0, x1], y) {
  ctx.save();
  ctx.beginPath();
  ctx.rect(x0, y - ROW_H / 2, x1 - x0, ROW_H);
  ctx.clip();
  ctx.fillText(text, x0, y);
  ctx.restore();
}

// Nodes 2.0 (Vue nodes, 1.49.6 and 1.58.1) draws each row on a canvas element of its own: that canvas -> its row.
const rowCanvases = new WeakMap();

function rowWidget(name, value) {
  // Click zones, left to right: [on/off] [LoRA name ...] [blocks] [model strength] [clip strength] [x]
  return {
    name,
    type: "batch_lora_row",
    tooltip: TIPS.row,
    value: rowValue(value),
    options: {},
    zones: {},
    at: null, // where the graph canvas (classic mode) drew the row last: {y, h} in node coordinates
    computeSize(width) {
      return [width, ROW_H];
    },
    draw(ctx, node, width, y, h) {
      if (ctx.canvas === app.canvas?.canvas) this.at = { y, h };
      else rowCanvases.set(ctx.canvas, this);
      const v = this.value;
      const m = 10, sw = 46, bw = 64;
      const z = (this.zones = {
        on: [m, m + 18],
        name: [m + 24, width - m - 2 * sw - bw - 36],
        blocks: [width - m - 2 * sw - bw - 30, width - m - 2 * sw - 30],
        sm: [width - m - 2 * sw - 24, width - m - sw - 24],
        sc: [width - m - sw - 20, width - m - 20],
        del: [width - m - 16, width - m],
      });
      const mid = y + h / 2;
      ctx.save();
      ctx.fillStyle = "#222";
      ctx.beginPath();
      ctx.roundRect(m, y + 2, width - 2 * m, h - 4, 6);
      ctx.fill();
      ctx.globalAlpha = v.on ? 1 : 0.45;
      ctx.fillStyle = v.on ? "#6a6" : "#555";
      ctx.beginPath();
      ctx.arc(z.on[0] + 9, mid, 6, 0, Math.PI * 2);
      ctx.fill();
      ctx.font = "12px sans-serif";
      ctx.textBaseline = "middle";
      let nameZone = z.name;
      if (v.missing) { // loaded from a saved stack, its file is not in models/loras
        ctx.globalAlpha = 1;
        ctx.fillStyle = "#e66";
        ctx.textAlign = "right";
        ctx.fillText("missing", z.name[1], mid);
        ctx.textAlign = "left";
        nameZone = [z.name[0], z.name[1] - ctx.measureText("missing").width - 6];
      } else ctx.fillStyle = "#ddd";
      clipped(ctx, v.lora || "(pick a LoRA)", nameZone, mid);
      ctx.globalAlpha = v.on ? 1 : 0.45;
      ctx.fillStyle = v.blocks ? "#cb8" : "#666";
      ctx.font = "11px sans-serif";
      const blocks = v.blocks ? String(v.blocks) : "blocks";
      if (ctx.measureText(blocks).width <= z.blocks[1] - z.blocks[0]) {
        ctx.textAlign = "center";
        ctx.fillText(blocks, (z.blocks[0] + z.blocks[1]) / 2, mid);
      } else clipped(ctx, blocks, z.blocks, mid);
      ctx.font = "12px sans-serif";
      ctx.textAlign = "center";
      ctx.fillStyle = "#aac";
      ctx.fillText(fmt(v.strength_model), (z.sm[0] + z.sm[1]) / 2, mid);
      ctx.fillStyle = "#caa";
      ctx.fillText(fmt(v.strength_clip), (z.sc[0] + z.sc[1]) / 2, mid);
      ctx.fillStyle = "#999";
      ctx.fillText("\u2715", (z.del[0] + z.del[1]) / 2, mid);
      ctx.restore();
    },
    zoneAt(x) {
      return Object.keys(this.zones).find((k) => x >= this.zones[k][0] && x <= this.zones[k][1]);
    },
    mouse(event, pos, node) {
      if (event.type !== "pointerdown" && event.type !== "mousedown") return false;
      const zone = this.zoneAt(pos[0]);
      const v = this.value;
      // prompt() places its box on LGraphCanvas.active_canvas, the graph canvas that last had a pointer event. In
      // Nodes 2.0 a row click reaches only the row's own canvas, so in 1.49.6 there may be none yet (it throws).
      const ask = (title, value, done) => {
        LiteGraph.LGraphCanvas.active_canvas ??= app.canvas;
        app.canvas.prompt(title, value, (text) => { done(String(text)); redraw(node); }, event);
      };
      if (zone === "on") v.on = !v.on;
      else if (zone === "del") removeRow(node, this);
      else if (zone === "name") pickLora(event, (name) => {
        v.lora = name;
        delete v.missing;
        redraw(node);
      });
      else if (zone === "blocks") ask("blocks (preset or w1,w2,...; empty clears)", v.blocks ?? "", (text) => {
        if (text.trim()) v.blocks = text.trim();
        else delete v.blocks;
      });
      else if (zone === "sm" || zone === "sc") {
        const key = zone === "sm" ? "strength_model" : "strength_clip";
        ask(key, v[key], (text) => {
          const n = Number(text);
          if (Number.isFinite(n)) v[key] = n;
        });
      } else return false;
      redraw(node);
      return true;
    },
    serializeValue() {
      return { ...this.value };
    },
  };
}

// ---- LoRA info: preview image, title, base model, trigger words (GET /batch_lora/info, nodes/info.py)

const infos = new Map(); // LoRA name -> promise of its info document, or of {error}; one request per name and page

function loraInfo(name) {
  if (!infos.has(name)) {
    const url = `/batch_lora/info?lora=${encodeURIComponent(name)}`;
    infos.set(name, api.fetchApi(url).then(async (res) => {
      const doc = await res.json().catch(() => null);
      return res.ok && doc ? doc : { error: doc?.error ?? `no information (HTTP ${res.status})` };
    }).catch(() => ({ error: "no information (the server did not answer)" })));
  }
  return infos.get(name);
}

const el = (tag, props, parent) => parent.appendChild(Object.assign(document.createElement(tag), props));

// Fills `box` with what is known of the LoRA `name`: preview image (none when there is none or it fails to load),
// title, base model, trigger words; all text as textContent. `changed` runs after each change of its size.
async function loraCard(box, name, changed = () => {}) {
  box.dataset.lora = name;
  box.replaceChildren(el("div", { className: "sub", textContent: "\u2026" }, box));
  const info = await loraInfo(name);
  if (box.dataset.lora !== name) return; // meanwhile it shows another LoRA
  box.replaceChildren();
  if (info.preview) {
    const img = el("img", { alt: "", src: api.apiURL(info.preview) }, box);
    img.addEventListener("load", changed);
    img.addEventListener("error", () => { img.remove(); changed(); });
  }
  el("div", { className: "title", textContent: info.title || name }, box);
  if (info.error) el("div", { className: "sub", textContent: info.error }, box);
  if (info.base_model) el("div", { className: "sub", textContent: info.base_model }, box);
  const words = info.trigger_words ?? [];
  const says = words.length ? "Trigger words:" : "No trigger words";
  if (!info.error) el("div", { className: "sub", textContent: says }, box);
  const list = el("div", { className: "words" }, box);
  for (const w of words) el("span", { className: "word", textContent: w }, list);
  changed();
}

// ---- the card shown while the pointer rests on a row's file name on a node (classic canvas and Nodes 2.0)

// The row under a pointer event, and x in the row's coordinates: in Nodes 2.0 from the row's own canvas, in classic
// mode from the graph canvas (its view transform, the node under the point, the rows' last drawn places). Neither
// mode passes pointer moves to a canvas widget unless a button is down, so they are tracked here.
function rowAt(e) {
  const own = rowCanvases.get(e.target);
  if (own) {
    const r = e.target.getBoundingClientRect();
    const width = own.zones.del?.[1] + 10 || r.width; // the width of its last draw (the zones' right margin is 10)
    return { w: own, x: ((e.clientX - r.left) * width) / r.width, vue: true };
  }
  const c = app.canvas;
  if (!c || e.target !== c.canvas) return null;
  const r = c.canvas.getBoundingClientRect();
  const [gx, gy] = c.ds.convertCanvasToOffset([e.clientX - r.left, e.clientY - r.top]);
  const node = (c.graph ?? app.graph)?.getNodeOnPos(gx, gy);
  if (node?.type !== NODE || node.flags?.collapsed) return null;
  const y = gy - node.pos[1];
  const w = rows(node).find((w) => w.at && y >= w.at.y && y < w.at.y + w.at.h);
  return w ? { w, x: gx - node.pos[0] } : null;
}

const hover = { name: null, timer: 0, card: null };

function hoverCard(name, at) {
  if (name === hover.name) return;
  clearTimeout(hover.timer);
  hover.card?.remove();
  Object.assign(hover, { name, card: null });
  if (!name) return;
  hover.timer = setTimeout(() => {
    css();
    const card = (hover.card = el("div", { className: "batch-lora-info batch-lora-card" }, document.body));
    const place = () => { // above the pointer (over the row above, not this one), inside the window
      const r = card.getBoundingClientRect();
      const top = at.clientY - r.height - 14;
      card.style.left = `${Math.max(0, Math.min(at.clientX + 8, window.innerWidth - r.width - 4))}px`;
      card.style.top = `${top >= 0 ? top : Math.min(at.clientY + 24, window.innerHeight - r.height - 4)}px`;
    };
    loraCard(card, name, place);
  }, 250);
}

window.addEventListener("pointermove", (e) => {
  const hit = e.buttons ? null : rowAt(e);
  const zone = hit?.w.zoneAt(hit.x);
  if (hit && !hit.vue) hit.w.tooltip = zone ? TIPS[zone === "name" && !hit.w.value.lora ? "pick" : zone] : TIPS.row;
  hoverCard(zone === "name" ? hit.w.value.lora : null, e);
}, true);
window.addEventListener("pointerdown", () => hoverCard(null), true);
window.addEventListener("wheel", () => hoverCard(null), { capture: true, passive: true });

// ---- the picker

// A small menu of the pack's own, built from DOM nodes, each entry set as textContent (never as HTML). It replaces
// LiteGraph.ContextMenu, whose addItem sets each entry's innerHTML from the string in frontend 1.32.9, so a file in
// models/loras named like `<img src=x onerror=...>.safetensors` ran script when the menu opened; 1.49.6 and 1.58.1
// set textContent instead, so escaping the names would show "&lt;..." there. One picker at a time.
let picker = null; // the open picker's close function
// Where a pointer last went down: the picker opens there when it gets no event, as from Nodes 2.0's button element,
// which calls the widget's callback without one (1.49.6, 1.58.1).
let pointer = { clientX: 0, clientY: 0 };
window.addEventListener("pointerdown", (e) => (pointer = e), true);

const CSS = `
.batch-lora-picker { position: fixed; z-index: 10000; display: flex; flex-direction: column; gap: 4px; padding: 4px;
  min-width: 220px; max-width: min(480px, 60vw); max-height: min(420px, 80vh); box-sizing: border-box;
  background: var(--comfy-menu-bg, #353535); color: var(--fg-color, #fff); font: 13px sans-serif;
  border: 1px solid var(--border-color, #4e4e4e); border-radius: 6px; box-shadow: 0 4px 16px rgba(0, 0, 0, 0.5); }
.batch-lora-picker input { background: var(--comfy-input-bg, #222); color: inherit; font: inherit; outline: none;
  border: 1px solid var(--border-color, #4e4e4e); border-radius: 4px; padding: 4px 6px; }
.batch-lora-picker [role=listbox] { overflow-y: auto; }
.batch-lora-picker [role=option] { padding: 3px 6px; border-radius: 4px; cursor: pointer; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; }
.batch-lora-picker [role=option]:hover, .batch-lora-picker [role=option].active {
  background: var(--comfy-menu-secondary-bg, #292929); }
.batch-lora-picker [role=option].action { font-style: italic; }
.batch-lora-picker .empty { padding: 3px 6px; color: var(--descrip-text, #999); }
.batch-lora-info { box-sizing: border-box; width: 240px; padding: 6px; display: flex; flex-direction: column;
  gap: 3px; background: var(--comfy-menu-bg, #353535); color: var(--fg-color, #fff); font: 12px sans-serif;
  border: 1px solid var(--border-color, #4e4e4e); border-radius: 6px; box-shadow: 0 4px 16px rgba(0, 0, 0, 0.5);
  overflow-wrap: anywhere; }
.batch-lora-info[hidden] { display: none; }
.batch-lora-picker > .batch-lora-info { position: absolute; top: -1px; left: calc(100% + 6px); }
.batch-lora-picker.left > .batch-lora-info { left: auto; right: calc(100% + 6px); }
.batch-lora-card { position: fixed; z-index: 10001; pointer-events: none; }
.batch-lora-info img { max-width: 100%; max-height: 240px; object-fit: contain; align-self: center;
  border-radius: 4px; image-rendering: auto; }
.batch-lora-info .title { font-weight: bold; }
.batch-lora-info .sub { color: var(--descrip-text, #999); }
.batch-lora-info .words { display: flex; flex-wrap: wrap; gap: 3px; }
.batch-lora-info .word { padding: 1px 5px; border-radius: 3px; background: var(--comfy-input-bg, #222); }`;

function css() {
  if (document.getElementById("batch-lora-css")) return;
  const style = document.head.appendChild(document.createElement("style"));
  style.id = "batch-lora-css";
  style.textContent = CSS;
}

// Opens the picker at the event's place (or where a pointer last went down). items: [{label, pick(event), fixed}]:
// typing filters the labels (fixed items always stay), Up/Down move the active entry, Enter picks it (at first the
// first match that is not fixed), a click picks an entry, Escape or a click outside closes it. `none`: the text
// when there are no items but fixed ones. describe(item, box): fills the panel beside the list for the entry under
// the pointer or made active by the keys, or returns false (no panel).
function openPicker(event, { items, placeholder, none, describe = () => false }) {
  const at = Number.isFinite(event?.clientX) ? event : pointer;
  picker?.();
  css();
  const root = el("div", { className: "batch-lora-picker" }, document.body);
  const filter = el("input", { type: "text", placeholder, spellcheck: false }, root);
  const list = el("div", { role: "listbox" }, root);
  const panel = el("div", { className: "batch-lora-info", hidden: true }, root);
  let active = null, shownIn = null; // the active entry; the entry the panel describes
  const entries = items.map((item) => {
    const e = el("div", { role: "option", textContent: item.label, title: item.label }, list); // title: in full
    e.classList.toggle("action", !!item.fixed); // not "fixed": the frontend's CSS has a .fixed class
    e.addEventListener("click", (ev) => pick(item, ev));
    e.addEventListener("pointerenter", () => show(e));
    return e;
  });
  const empty = el("div", { className: "empty" }, list);
  const shown = () => entries.filter((e) => !e.hidden);
  const show = (e) => {
    shownIn = e;
    panel.hidden = !e || describe(items[entries.indexOf(e)], panel) === false;
  };
  const activate = (e, describeIt) => {
    active?.classList.remove("active");
    active?.setAttribute("aria-selected", "false");
    active = e;
    e?.classList.add("active");
    e?.setAttribute("aria-selected", "true");
    if (describeIt && e) {
      e.scrollIntoView({ block: "nearest" });
      show(e);
    }
  };
  const update = () => {
    const q = filter.value.trim().toLowerCase();
    entries.forEach((e, i) => (e.hidden = !items[i].fixed && !items[i].label.toLowerCase().includes(q)));
    const found = shown().filter((e) => !items[entries.indexOf(e)].fixed);
    activate(found[0] ?? null, false); // what Enter picks
    empty.textContent = items.some((item) => !item.fixed) ? "(no match)" : none;
    empty.hidden = found.length > 0;
    if (shownIn?.hidden) show(null);
  };
  const close = () => {
    window.removeEventListener("pointerdown", outside, true);
    window.removeEventListener("keydown", escape, true);
    root.remove();
    if (picker === close) picker = null;
  };
  const pick = (item, ev) => {
    close();
    item.pick(ev);
  };
  const outside = (e) => root.contains(e.target) || close();
  const escape = (e) => e.key === "Escape" && close(); // also when the focus is elsewhere
  filter.addEventListener("input", update);
  root.addEventListener("keydown", (e) => {
    e.stopPropagation(); // typing here is no shortcut of the frontend's (its keybindings listen on window, document)
    const all = shown();
    if (e.key === "Enter") {
      e.preventDefault();
      if (active) pick(items[entries.indexOf(active)], e);
    } else if ((e.key === "ArrowDown" || e.key === "ArrowUp") && all.length) {
      e.preventDefault();
      const step = e.key === "ArrowDown" ? 1 : -1;
      const i = all.indexOf(active);
      activate(all[i < 0 ? (step > 0 ? 0 : all.length - 1) : (i + step + all.length) % all.length], true);
    }
  });
  window.addEventListener("pointerdown", outside, true);
  window.addEventListener("keydown", escape, true);
  picker = close;
  update();
  // At the click, moved back inside the window where it would stick out; the panel on the side with room.
  const r = root.getBoundingClientRect();
  const left = Math.max(0, Math.min(at.clientX, window.innerWidth - r.width - 4));
  root.style.left = `${left}px`;
  root.style.top = `${Math.max(0, Math.min(at.clientY, window.innerHeight - r.height - 4))}px`;
  root.classList.toggle("left", left + r.width + 250 > window.innerWidth && left > 250);
  filter.focus();
}

async function pickLora(event, done) {
  const names = await loraNames();
  openPicker(event, {
    items: names.map((name) => ({ label: name, pick: () => done(name) })),
    placeholder: "Filter LoRAs",
    none: "(no LoRA files in models/loras)",
    describe: (item, box) => { loraCard(box, item.label); },
  });
}

// ---- saved stacks: ComfyUI user data, batch_lora/stacks/<name>.json = {format, version, rows} (contract)

const STACKS = "batch_lora/stacks";
const STACK_FORMAT = "batch-lora-stack";
const stackFile = (name) => `${STACKS}/${name}.json`;

// A stack name as a safe file name: letters and digits (any script), space and - _ . ( ) are kept, every other
// character becomes "_"; at most 64 characters, no leading or trailing space or dot, and a name Windows reserves
// (CON, NUL, COM1, ...) gets a leading "_". "" when nothing is left.
function stackName(text) {
  const s = String(text ?? "").trim().replace(/[^\p{L}\p{N} ._()-]/gu, "_").slice(0, 64).replace(/^[ .]+|[ .]+$/g, "");
  return /^(con|prn|aux|nul|com\d|lpt\d)(\.|$)/i.test(s) ? `_${s}` : s;
}

// A row as a stack stores it: the row fields of the contract, no "missing".
function stackRow(v) {
  const r = { on: v.on, lora: v.lora, strength_model: v.strength_model, strength_clip: v.strength_clip };
  if (v.blocks) r.blocks = v.blocks;
  return r;
}

function notify(severity, summary, detail) {
  const toast = app.extensionManager?.toast;
  if (toast?.add) toast.add({ severity, summary, detail, life: 6000 });
  else console.info(`[Batch LoRA] ${summary}: ${detail}`);
}

async function confirmOverwrite(name, count) {
  const message = `A saved stack named "${name}" exists. Replace it with this node's ${count} row(s)?`;
  const dialog = app.extensionManager?.dialog;
  if (!dialog?.confirm) return window.confirm(message);
  return (await dialog.confirm({ title: "Overwrite saved stack?", message, type: "overwrite" })) === true;
}

// The names of the saved stacks (the .json files directly in batch_lora/stacks), sorted.
async function stackNames() {
  const files = await api.listUserDataFullInfo(STACKS).catch(() => []);
  return files.map((f) => f.path).filter((p) => !p.includes("/") && p.endsWith(".json")).map((p) => p.slice(0, -5))
    .sort((a, b) => a.localeCompare(b));
}

// Asks for a name (the frontend's prompt) and stores the node's rows under it; an existing name asks first.
function saveStack(node, event) {
  LiteGraph.LGraphCanvas.active_canvas ??= app.canvas;
  app.canvas.prompt("Save rows as stack", "", async (text) => {
    const name = stackName(text);
    if (!name) {
      notify("warn", "Stack not saved", "Give it a name of letters, digits, spaces, - _ . ( )");
      return;
    }
    const doc = { format: STACK_FORMAT, version: 1, rows: rows(node).map((w) => stackRow(w.value)) };
    const store = (overwrite) => api.storeUserData(stackFile(name), doc,
      { overwrite, stringify: true, throwOnError: false, full_info: false });
    // Asked first for a name listed; a file the list did not show (another tab, a case-insensitive file system)
    // answers 409 to overwrite=false and is asked for then.
    const asked = (await stackNames()).includes(name);
    if (asked && !(await confirmOverwrite(name, doc.rows.length))) return;
    let res = await store(asked);
    if (res.status === 409) {
      if (!(await confirmOverwrite(name, doc.rows.length))) return;
      res = await store(true);
    }
    if (res.ok) notify("success", `Saved stack "${name}"`, `${doc.rows.length} row(s), user data ${stackFile(name)}`);
    else notify("error", `Stack "${name}" not saved`, `the server answered ${res.status} ${res.statusText}`);
  }, event);
}

// The saved stack `name`'s rows, or throws an Error saying why not.
async function readStack(name) {
  const res = await api.getUserData(stackFile(name));
  if (!res.ok) throw new Error(`could not read ${stackFile(name)} (HTTP ${res.status})`);
  const doc = await res.json().catch(() => null);
  if (doc?.format !== STACK_FORMAT || doc.version !== 1 || !Array.isArray(doc.rows) || !doc.rows.every(isRow))
    throw new Error(`${stackFile(name)} is not a Batch LoRA stack (format "${STACK_FORMAT}", version 1, rows)`);
  return doc.rows;
}

// Replaces the node's rows with the saved stack's; a row whose file is not in models/loras now comes in off and
// marked missing (kept: picking a file for it clears the mark).
async function loadStack(node, name) {
  let saved;
  try {
    saved = await readStack(name);
  } catch (err) {
    notify("error", `Stack "${name}" not loaded`, err.message);
    return;
  }
  const have = new Set(await loraNames());
  const values = saved.map((r) => {
    const v = stackRow(rowValue(r));
    return v.lora && !have.has(v.lora) ? { ...v, on: false, missing: true } : v;
  });
  setRows(node, values);
  const missing = values.filter((v) => v.missing).map((v) => v.lora);
  if (missing.length) notify("warn", `Stack "${name}": ${missing.length} file(s) not in models/loras`,
    `${missing.join(", ")}: those rows are off and marked missing; pick a file for each or remove it`);
}

// The panel of a saved stack in the menu: its rows.
async function stackCard(box, name) {
  box.dataset.stack = name;
  box.replaceChildren(el("div", { className: "title", textContent: name }, box));
  let text;
  try {
    const saved = await readStack(name);
    text = saved.map((r) => `${r.on === false ? "off " : ""}${r.lora} ${fmt(r.strength_model ?? 1)}/` +
      `${fmt(r.strength_clip ?? r.strength_model ?? 1)}${r.blocks ? ` [${r.blocks}]` : ""}`);
    if (!text.length) text = ["(no rows)"];
  } catch (err) {
    text = [err.message];
  }
  if (box.dataset.stack !== name) return;
  for (const t of text) el("div", { className: "sub", textContent: t }, box);
}

async function stacksMenu(event, node) {
  const names = await stackNames();
  openPicker(event, {
    items: [{ label: "Save current rows as\u2026", fixed: true, pick: (e) => saveStack(node, e) },
      ...names.map((name) => ({ label: name, pick: () => loadStack(node, name) }))],
    placeholder: "Filter saved stacks",
    none: "(no saved stacks yet)",
    describe: (item, box) => (item.fixed ? false : void stackCard(box, item.label)),
  });
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

function setRows(node, values) {
  // The node's rows become `values`: the rows there take the first values (names kept, as in removeRow), rows are
  // added for the others or the extra ones go from the end.
  const rs = rows(node);
  values.forEach((v, i) => (i < rs.length ? (rs[i].value = rowValue(v)) : addRow(node, v)));
  for (const w of rs.slice(values.length).reverse()) node.removeWidget(w);
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
      // Buttons are no inputs: options.serialize = false keeps them out of API prompts, serialize = false out of
      // widgets_values (else null per button), so that stays [row, row, ...].
      const button = (label, tooltip, callback) => {
        const w = this.addWidget("button", label, null, callback);
        Object.assign(w, { serialize: false, tooltip });
        w.options.serialize = false;
      };
      button("+ Add LoRA", TIPS.add, (w, canvas, node, pos, event) => {
        pickLora(event, (name) => addRow(this, { lora: name }));
      });
      button("Toggle all", TIPS.all, () => {
        const rs = rows(this);
        const on = !rs.every((w) => w.value.on);
        rs.forEach((w) => (w.value.on = on));
        redraw(this);
      });
      button("Stacks", TIPS.stacks, (w, canvas, node, pos, event) => stacksMenu(event, this));
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

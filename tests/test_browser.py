"""The pack in ComfyUI's real frontend (1.32.9, served by the real server), driven in headless Chromium from
Debian's package by Playwright, as a user would: add the Batch LoRA Loader from the node library, pick two LoRAs
from its dropdown, toggle a row, open each example workflow from the template browser (no missing-nodes
dialog), compare the frontend's own API export with workflows/api/, queue it and see the output image; drop each
API-format twin on the canvas and get the same rows back.

Screenshots go to ``.work/browser/``; with BATCH_LORA_UPDATE_SCREENSHOTS=1 they also replace the README's
(``docs/``) and the template thumbnails (``workflows/<name>.jpg``).
"""
import json
import os
import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

import make_fixtures as fx
from comfy_server import PACK_LINK_NAME, ComfyServer

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("BATCH_LORA_CHROMIUM", "/usr/bin/chromium")
SHOTS = ROOT / ".work" / "browser"
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set BATCH_LORA_CHROMIUM)",
                allow_module_level=True)
from playwright.sync_api import expect, sync_playwright  # noqa: E402  (after the skip: CI installs both)


def publish(shot: Path, target: Path) -> None:
    """Copy a screenshot over the committed one when BATCH_LORA_UPDATE_SCREENSHOTS=1."""
    if os.environ.get("BATCH_LORA_UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(shot, target)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("browser")
    fx.make_fixtures(base)
    # A returning user (the frontend opens the template browser by itself for first-time users), no minimap.
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}))
    with ComfyServer(base) as srv:
        yield srv


@pytest.fixture(scope="module")
def page(server):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        context.route(lambda url: not url.startswith(server.url), lambda route: route.abort())  # stay offline
        context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")  # the Nodes 2.0 ad
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.errors = errors
        page.goto(server.url)
        page.wait_for_function("window.app && window.app.graph && window.app.canvas", timeout=120_000)
        page.wait_for_timeout(1000)
        expect(page.locator(".p-dialog")).to_have_count(0)
        yield page
        browser.close()


def settle(page):
    """Wait until the canvas element has kept its size and place for a few frames (panels animate open/closed)
    and the graph was drawn since."""
    page.evaluate("""() => new Promise(done => {
        let last = '', same = 0;
        const tick = () => {
            const r = app.canvas.canvas.getBoundingClientRect(), now = [r.left, r.top, r.width, r.height].join();
            same = now === last ? same + 1 : 0; last = now;
            if (same >= 5) { app.canvas.draw(true, true); done(); } else requestAnimationFrame(tick);
        };
        tick();
    })""")


def loaders(page) -> list:
    """[{id, rows}] of the Batch LoRA Loader nodes on the canvas; rows are the values the row widgets hold."""
    return page.evaluate("""app.graph._nodes.filter(n => n.type === 'BatchLoraLoader').map(n => ({
        id: n.id, rows: n.widgets.filter(w => w.type === 'batch_lora_row').map(w => ({...w.value}))}))""")


def click_widget(page, node_id, widget: str, x=None):
    """Click widget ``widget`` (a name) of node ``node_id``, ``x`` canvas pixels from the node's left edge (default:
    the middle)."""
    page.mouse.click(*widget_point(page, node_id, widget, x))


def hover_widget(page, node_id, widget: str, x=None):
    """Move the mouse onto widget ``widget`` of node ``node_id`` (see ``click_widget``)."""
    page.mouse.move(*widget_point(page, node_id, widget, x), steps=3)


def widget_point(page, node_id, widget: str, x=None) -> tuple:
    """Page coordinates of a point in widget ``widget`` of node ``node_id``."""
    return page.evaluate("""([id, name, x]) => {
        const n = app.graph.getNodeById(id), w = n.widgets.find(w => w.name === name);
        const h = w.computeSize ? w.computeSize(n.size[0])[1] : LiteGraph.NODE_WIDGET_HEIGHT;
        const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + (x ?? n.size[0] / 2), n.pos[1] + w.last_y + h / 2]);
        const r = app.canvas.canvas.getBoundingClientRect();
        return [r.left + cx, r.top + cy];
    }""", [node_id, widget, x])


def pick_from_menu(page, entry: str):
    """Click ``entry`` in the LiteGraph context menu that is open."""
    item = page.locator(".litecontextmenu .litemenu-entry", has_text=entry)
    expect(item.first).to_be_visible()
    item.first.click()
    expect(page.locator(".litecontextmenu")).to_have_count(0)


def screenshot_nodes(page, path: Path, node_id=None, margin=12, **kw):
    """Screenshot of one node (or of every node) on the canvas, plus a margin."""
    box = page.evaluate("""([id, m]) => {
        const ns = id === null ? app.graph._nodes : [app.graph.getNodeById(id)];
        const ds = app.canvas.ds, r = app.canvas.canvas.getBoundingClientRect(), T = LiteGraph.NODE_TITLE_HEIGHT;
        const [x0, y0] = ds.convertOffsetToCanvas([Math.min(...ns.map(n => n.pos[0])), Math.min(...ns.map(n => n.pos[1] - T))]);
        const [x1, y1] = ds.convertOffsetToCanvas([Math.max(...ns.map(n => n.pos[0] + n.size[0])),
                                                   Math.max(...ns.map(n => n.pos[1] + n.size[1]))]);
        return {x: r.left + x0 - m, y: r.top + y0 - m, width: x1 - x0 + 2 * m, height: y1 - y0 + 2 * m};
    }""", [node_id, margin])
    page.screenshot(path=str(path), clip=box, **kw)


def test_add_loader_from_node_library_and_pick_two_loras(page):
    page.evaluate("app.graph.clear()")
    page.get_by_role("button", name="Node Library (n)").click()
    page.get_by_placeholder("Search Nodes...").fill("Batch LoRA")
    page.locator(".node-lib-node-container", has_text="Batch LoRA Loader").first.click()
    page.get_by_role("button", name="Node Library (n)").click()  # close the panel again
    expect(page.get_by_placeholder("Search Nodes...")).to_be_hidden()
    nodes = loaders(page)
    assert len(nodes) == 1 and nodes[0]["rows"] == []
    node = nodes[0]["id"]
    page.evaluate("""id => { const n = app.graph.getNodeById(id); n.pos = [420, 260];
                             app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 1; app.canvas.setDirty(true, true); }""",
                  node)
    settle(page)
    for name in (fx.LORA_KOHYA_A, fx.LORA_PEFT_C):
        click_widget(page, node, "+ Add LoRA")
        pick_from_menu(page, name)
    rows = loaders(page)[0]["rows"]
    assert rows == [{"on": True, "lora": fx.LORA_KOHYA_A, "strength_model": 1.0, "strength_clip": 1.0},
                    {"on": True, "lora": fx.LORA_PEFT_C, "strength_model": 1.0, "strength_clip": 1.0}]
    click_widget(page, node, "lora_2", x=19)  # the row's on/off dot
    assert [r["on"] for r in loaders(page)[0]["rows"]] == [True, False]
    click_widget(page, node, "Toggle all")
    assert [r["on"] for r in loaders(page)[0]["rows"]] == [True, True]
    click_widget(page, node, "lora_2", x=19)
    page.mouse.move(0, 0)
    hover_widget(page, node, "lora_1")
    expect(page.get_by_text("Click the dot to turn it on/off")).to_be_visible()  # the row's tooltip
    page.mouse.move(0, 0)
    settle(page)
    screenshot_nodes(page, SHOTS / "batch_lora_loader.png", node)
    publish(SHOTS / "batch_lora_loader.png", ROOT / "docs" / "batch_lora_loader.png")
    assert page.errors == []


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_example_workflow_from_template_browser_runs(page, server, workflow):
    name = workflow.stem
    page.get_by_role("button", name="Templates").click()
    expect(page.locator("[data-testid^='template-workflow-']").first).to_be_visible()  # the list has loaded
    page.locator(".p-dialog").get_by_placeholder("Search").fill(name)
    card = page.get_by_test_id(f"template-workflow-{name}")
    expect(card).to_be_visible(timeout=60_000)  # the search filters ~190 templates: seconds on 2 busy cores
    card.click()
    nodes = sorted(f"{n['id']}:{n['type']}" for n in json.loads(workflow.read_text())["nodes"])
    page.wait_for_function("ns => JSON.stringify(app.graph._nodes.map(n => `${n.id}:${n.type}`).sort()) === "
                           "JSON.stringify(ns)", arg=nodes, timeout=60_000)  # the dialog closes before the load
    settle(page)
    expect(page.locator(".p-dialog")).to_have_count(0)  # the browser closed and no missing-nodes dialog opened
    exported = page.evaluate("app.graphToPrompt().then(p => p.output)")
    api = json.loads((ROOT / "workflows" / "api" / workflow.name).read_text())
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in exported.items()} == {
        k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    images = set()  # (subfolder, filename) of the output images the page fetched

    def on_response(r):
        query = parse_qs(urlparse(r.url).query)
        if "/view" in r.url and "filename" in query and r.ok:
            images.add((query.get("subfolder", [""])[0], query["filename"][0]))

    saves = sum(n["type"] == "SaveImage" for n in json.loads(workflow.read_text())["nodes"])
    page.on("response", on_response)
    page.get_by_test_id("queue-button").get_by_role("button", name="Run").first.click()
    for _ in range(720):  # up to 6 minutes on a busy machine
        if len(images) >= saves:
            break
        page.wait_for_timeout(500)
    page.remove_listener("response", on_response)
    assert len(images) == saves, f"output images the page fetched: {sorted(images)}"
    settle(page)
    screenshot_nodes(page, SHOTS / f"{name}.png")
    screenshot_nodes(page, SHOTS / f"{name}.jpg", type="jpeg", quality=80)
    publish(SHOTS / f"{name}.png", ROOT / "docs" / f"{name}.png")
    publish(SHOTS / f"{name}.jpg", workflow.with_suffix(".jpg"))
    assert page.errors == []
    thumb = server.get(f"/api/workflow_templates/{PACK_LINK_NAME}/{name}.jpg")  # what the template browser shows
    assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff", f"workflows/{name}.jpg is missing"


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_api_json_dropped_on_canvas_keeps_rows(page, workflow):
    """An API-format prompt file dropped on the canvas (app.handleFile -> app.loadApiJson) rebuilds every loader
    row, so the frontend's API export of the loaded graph is the file again."""
    api_file = ROOT / "workflows" / "api" / workflow.name
    page.evaluate("app.graph.clear()")
    page.evaluate("""([text, name]) => app.handleFile(new File([text], name, {type: 'application/json'}))""",
                  [api_file.read_text(), api_file.name])
    api = json.loads(api_file.read_text())
    page.wait_for_function("n => app.graph._nodes.length === n", arg=len(api), timeout=30_000)
    expect(page.locator(".p-dialog")).to_have_count(0)
    expected = {k: [v["inputs"][n] for n in sorted((n for n in v["inputs"] if n.startswith("lora_")),
                                                   key=lambda n: int(n[5:]))]
                for k, v in api.items() if v["class_type"] == "BatchLoraLoader"}
    assert expected and all(expected.values())  # the file has loaders with rows
    assert {str(n["id"]): n["rows"] for n in loaders(page)} == expected
    exported = page.evaluate("app.graphToPrompt().then(p => p.output)")
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in exported.items()} == {
        k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert page.errors == []

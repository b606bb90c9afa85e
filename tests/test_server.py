"""The real ComfyUI server with this pack, driven over HTTP like a user's client: the example API workflow posted
unchanged, a short version of the main job's drift check (with a fresh second process), a bad prompt that
fails cleanly while the server keeps serving bit-identical results, rgthree-shaped prompts and the LORA_STACK /
tag outputs, and the status route and progress events of a bake."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import main_job
import make_fixtures as fx
from comfy_server import ComfyServer, PromptError, cached_nodes, device_flags, host_version

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("server")
    fx.make_fixtures(base)
    with ComfyServer(base, extra_args=["--fp16-unet"]) as srv:
        yield srv


def test_nodes_are_registered_with_tooltips(server):
    info = server.get("/object_info").json()
    loader, reset = info["BatchLoraLoader"], info["BatchLoraResetAdapters"]
    assert loader["display_name"] == "Batch LoRA Loader" and reset["display_name"] == "Reset Adapters"
    assert loader["output"] == ["MODEL", "CLIP", "STRING", "LORA_STACK", "STRING", "STRING", "STRING"]
    assert loader["output_name"] == ["MODEL", "CLIP", "report", "lora_stack", "lora_tags", "trigger_words",
                                     "loaded_loras"]
    assert all(loader["output_tooltips"]) and len(loader["output_tooltips"]) == 7
    for node in (loader, reset):
        assert node["description"] and node["category"] == "loaders/batch lora"
        for group in ("required", "optional"):
            for name, spec in node["input"].get(group, {}).items():
                assert spec[1].get("tooltip"), name


def test_example_api_workflow_runs_unchanged(server):
    prompt = json.loads((ROOT / "workflows" / "api" / "batch_lora_txt2img.json").read_text())
    entry = server.queue(prompt)
    latent = server.read_output_latent(entry, "7")
    assert latent.shape == (1, 4, 8, 8) and bool(torch.isfinite(latent).all())
    images = server.output_files(entry, "images", "9")
    assert len(images) == 1 and images[0].stat().st_size > 0


def test_short_drift_run_and_fresh_process(tmp_path):
    """The main job's own code, 15 prompts (3 per case) and a second, fresh server process."""
    fx.make_fixtures(tmp_path)
    run = main_job.run_server(tmp_path, 15, restart_check=True)
    table, failures = main_job.drift_table(run)
    assert failures == []
    assert [r["distinct_hashes"] for r in table] == [1] * 5
    assert all(r["fresh_process_identical"] for r in table)
    by_case = {r["case"]: r["hash"] for r in table}
    assert by_case["reset"] == by_case["plain"]
    assert len({by_case[c] for c in ("one_lora", "three_loras", "three_loras_other_strengths", "plain")}) == 4


def test_bad_prompt_fails_cleanly_and_server_keeps_serving(server):
    good = main_job.prompt_for("three_loras")
    first = server.read_output_latent(server.queue(good), main_job.SAVE)
    bad = main_job.prompt_for("three_loras")
    bad["2"]["inputs"]["lora_2"]["lora"] = "no_such_lora.safetensors"
    with pytest.raises(PromptError, match="no_such_lora.safetensors"):
        server.queue(bad)
    plain = server.read_output_latent(server.queue(main_job.prompt_for("plain")), main_job.SAVE)
    assert not torch.equal(plain, first)
    entry = server.queue(good)
    assert main_job.SAMPLER not in cached_nodes(entry)  # really sampled again, not answered from the cache
    assert torch.equal(server.read_output_latent(entry, main_job.SAVE), first)


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """What the frontend's "Export (API)" does for these node types: links become [node id, slot], widget values
    are matched to the node's widget inputs in declaration order (a seed widget is followed by its
    control_after_generate value); Batch LoRA Loader rows become lora_1..lora_N."""
    links = {l[0]: l for l in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        inputs = {i["name"]: [str(links[i["link"]][1]), links[i["link"]][2]]
                  for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        if node["type"] == "BatchLoraLoader":
            inputs.update({f"lora_{i + 1}": v for i, v in enumerate(values)})
        else:
            info = object_info[node["type"]]["input"]
            for name, spec in [*info.get("required", {}).items(), *info.get("optional", {}).items()]:
                if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                    if name in inputs or not values:
                        continue
                    inputs[name] = values.pop(0)
                    if len(spec) > 1 and spec[1].get("control_after_generate"):
                        values.pop(0)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def test_ui_workflow_is_the_api_workflow(server):
    ui = json.loads((ROOT / "workflows" / "batch_lora_txt2img.json").read_text())
    api = json.loads((ROOT / "workflows" / "api" / "batch_lora_txt2img.json").read_text())
    converted = ui_to_api(ui, server.get("/object_info").json())
    assert converted == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    listed = server.get("/workflow_templates").json()
    assert "batch_lora_txt2img" in listed.get("comfyui-batch-lora", [])


def test_plain_path_in_the_same_prompt_gets_base_weights(server):
    """One prompt, two samplers: the LoRA path and a plain path on the same checkpoint. The plain latent equals
    the latent of a prompt that has only the plain path."""
    plain_only = server.read_output_latent(server.queue(main_job.prompt_for("plain")), main_job.SAVE)
    both = main_job.prompt_for("three_loras")
    plain = main_job.prompt_for("plain")
    for nid in ("3", "4", "6", "7"):  # the plain path's encoders, sampler and SaveLatent under new ids
        node = json.loads(json.dumps(plain[nid]))
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value[0] in ("3", "4", "6"):
                node["inputs"][name] = ["p" + value[0], value[1]]
        both["p" + nid] = node
    both["p7"]["inputs"]["filename_prefix"] = "same_prompt/plain"
    entry = server.queue(both)
    lora_latent = server.read_output_latent(entry, main_job.SAVE)
    assert torch.equal(server.read_output_latent(entry, "p7"), plain_only)
    assert not torch.equal(lora_latent, plain_only)


def _fresh(prompt: dict, tag: str) -> dict:
    """``prompt`` with its own seed and texts, so ComfyUI's cache cannot answer it and every model is loaded."""
    prompt = json.loads(json.dumps(prompt))
    seed = int.from_bytes(tag.encode()[:6].ljust(6, b"\0"), "little")
    prompt[main_job.SAMPLER]["inputs"]["seed"] = seed
    for nid in ("3", "4"):
        prompt[nid]["inputs"]["text"] += f" ({tag})"
    return prompt


def rgthree_rows(rows: dict) -> dict:
    """The loader rows in rgthree Power Lora Loader's API shape, with the extra keys its UI exports."""
    out = {"PowerLoraLoaderHeaderWidget": {"type": "PowerLoraLoaderHeaderWidget"}, "\u2795 Add Lora": ""}
    for key, r in rows.items():
        out[key] = {"on": r["on"], "lora": r["lora"], "strength": r["strength_model"],
                    "strengthTwo": r["strength_clip"]}
    return out


def test_ui_export_and_rgthree_prompt_give_the_same_latent(server):
    ui = json.loads((ROOT / "workflows" / "batch_lora_txt2img.json").read_text())
    exported = _fresh(ui_to_api(ui, server.get("/object_info").json()), "interop")
    for node in exported.values():
        if "filename_prefix" in node["inputs"]:
            node["inputs"]["filename_prefix"] = "interop/ui"
    ours = server.read_output_latent(server.queue(exported), main_job.SAVE)
    rgthree = json.loads(json.dumps(exported))
    loader = rgthree["2"]["inputs"]
    rows = {k: loader.pop(k) for k in [k for k in loader if k.startswith("lora_")]}
    loader.update(rgthree_rows(rows))
    loader["lora_4"] = {"on": False, "lora": fx.LORA_KOHYA_B, "strength": 3.0, "strengthTwo": None}
    entry = server.queue(rgthree)
    assert main_job.SAMPLER not in cached_nodes(entry)
    assert torch.equal(server.read_output_latent(entry, main_job.SAVE), ours)
    plain = server.read_output_latent(server.queue(_fresh(main_job.prompt_for("plain"), "interop")), main_job.SAVE)
    assert not torch.equal(plain, ours)


def test_lora_stack_and_tag_outputs(server):
    """The LORA_STACK output fed to a second loader on the plain model gives the first loader's latent; the tags
    and the stack are read back through ComfyUI's PreviewAny node."""
    direct = _fresh(main_job.prompt_for("three_loras"), "stack")
    first = server.read_output_latent(server.queue(direct), main_job.SAVE)
    relay = json.loads(json.dumps(direct))
    relay["12"] = {"class_type": "BatchLoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                                "lora_stack": ["2", 3]}}
    relay["3"]["inputs"]["clip"] = relay["4"]["inputs"]["clip"] = ["12", 1]
    relay[main_job.SAMPLER]["inputs"]["model"] = ["12", 0]
    relay["13"] = {"class_type": "PreviewAny", "inputs": {"source": ["12", 4]}}
    relay["14"] = {"class_type": "PreviewAny", "inputs": {"source": ["12", 3]}}
    entry = server.queue(relay)
    assert main_job.SAMPLER not in cached_nodes(entry)
    assert torch.equal(server.read_output_latent(entry, main_job.SAVE), first)
    assert entry["outputs"]["13"]["text"] == ["<lora:kohya_a:1:0.8> <lora:peft_c:0.5:0.6> <lora:kohya_b:0.7:-0.5>"]
    assert json.loads(entry["outputs"]["14"]["text"][0]) == [list(t) for t in main_job.THREE]


def _touched_numel() -> dict:
    """Elements of the weights the three fixture LoRAs touch, per model, from the fixtures' own manifest."""
    shapes = {}
    for info in fx.lora_manifest().values():
        for m in info.modules:
            shapes[m.model_key] = m.shape
    numel = {"BaseModel": [0, 0], "SD1ClipModel": [0, 0]}
    for key, shape in shapes.items():
        count = numel["BaseModel" if key.startswith("diffusion_model.") else "SD1ClipModel"]
        count[0] += 1
        count[1] += math.prod(shape)
    return numel


def test_status_route_and_progress_while_a_stack_is_applied(server):
    """After a plain prompt (ComfyUI restores every key), the three-LoRA prompt bakes every touched key again: the
    status route's numbers and the "progress" websocket events of that bake, checked against the fixtures."""
    server.queue(_fresh(main_job.prompt_for("plain"), "status"))
    before = {m["model"]: m for m in server.get("/batch_lora/status").json()["models"]}
    entry, events = server.queue_with_events(_fresh(main_job.prompt_for("three_loras"), "status"))
    status = server.get("/batch_lora/status").json()
    files = [load_file(str(server.base_dir / "models" / "loras" / name)) for name in fx.LORA_NAMES]
    assert status["lora_file_cache_bytes"] == sum(t.numel() * t.element_size() for f in files for t in f.values())
    after = {m["model"]: m for m in status["models"]}
    labels = [f"{n}@{sm:g}/{sc:g}" for n, sm, sc in main_job.THREE]
    progress = {}
    for kind, data in events:
        if kind == "progress":
            progress.setdefault(data["node"], []).append((data["value"], data["max"]))
    for model, (keys, numel) in _touched_numel().items():
        m = after[model]
        if m["patcher"] == "dynamic":  # a GPU run with DynamicVRAM (tests/gpu/dynamic_vram_gpu.py): no bake
            assert m["base_cache"] == {"bytes": 0, "keys": 0} and m["applied_stack"] == labels
            assert m["applied_keys"] == keys and m["counters"]["merges"] >= keys
            continue
        assert m["base_cache"] == {"bytes": 4 * numel, "keys": keys, "mode": "auto", "dtypes": ["float32"],
                                   "device": "cpu", "budget_bytes": None}
        assert m["applied_stack"] == labels and m["applied_keys"] == keys
        assert {k: m["last_apply"][k] for k in ("merged", "restored", "unchanged", "stack")} == {
            "merged": keys, "restored": 0, "unchanged": 0, "stack": labels}
        assert m["last_apply"]["ms"] > 0
        was = before.get(model, {"counters": dict.fromkeys(m["counters"], 0), "applied_stack": [],
                                 "applied_keys": 0})  # absent: this module's first pack load
        counted = {k: m["counters"][k] - was["counters"][k] for k in m["counters"]}
        # The plain prompt's restores (done by ComfyUI from the pack's base copies) are counted at this load:
        # every key, then every key merged again.
        moves = counted.pop("moves")
        assert moves == 0 or "--cpu" not in device_flags()  # ComfyUI's normal-VRAM GPU mode moves the model
        restored = keys if model in before else 0
        assert counted == {"merges": keys, "writes": keys, "restores": restored, "rollbacks": 0,
                           "host_restores": restored}
        assert was["applied_stack"] == [] and was["applied_keys"] == 0
        # The bake's progress bar, on the node whose model load triggered it: 1..keys of keys (ComfyUI 0.33
        # throttles ProgressBar.update_absolute to >= 100 ms and >= 0.5 % steps, always sending the first and the
        # last: then a rising subsequence from 1 to keys).
        node = main_job.SAMPLER if model == "BaseModel" else "4"
        done = [v[0] for v in progress.get(node, []) if v[1] == keys]
        assert done[0] == 1 and done[-1] == keys and done == sorted(set(done)), (model, progress.get(node))
        assert len(done) == keys or host_version() > (0, 3, 75), (model, done)  # 0.3.75 sends every key
    log = server.log_tail(20000)
    for model, (keys, _) in _touched_numel().items():
        if after[model]["patcher"] == "classic":
            assert f"batch-lora: {model}: {keys} keys merged, 0 restored, 0 unchanged in " in log


def test_lora_vs_reset_example_runs_unchanged(server):
    """workflows/api/batch_lora_vs_reset.json: one graph, the LoRA image, the tags, and the image after Reset
    Adapters (decoded pixels differ: the stack really was removed on that path)."""
    prompt = json.loads((ROOT / "workflows" / "api" / "batch_lora_vs_reset.json").read_text())
    entry = server.queue(prompt)
    assert entry["outputs"]["9"]["text"] == ["<lora:kohya_a:0.8> <lora:peft_c:0.5:0.6>"]
    (with_loras,), (after_reset,) = (server.output_files(entry, "images", nid) for nid in ("8", "15"))
    pixels = [np.asarray(Image.open(p)) for p in (with_loras, after_reset)]
    assert pixels[0].shape == pixels[1].shape == (64, 64, 3) and not np.array_equal(*pixels)

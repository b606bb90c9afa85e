"""The real ComfyUI server with this pack, driven over HTTP like a user's client: the example API workflow posted
unchanged, a short version of the main job's drift check (with a fresh second process), and a bad prompt that
fails cleanly while the server keeps serving bit-identical results."""
import json
from pathlib import Path

import pytest
import torch

import main_job
import make_fixtures as fx
from comfy_server import ComfyServer, PromptError, cached_nodes

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
    assert loader["output"] == ["MODEL", "CLIP", "STRING"]
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

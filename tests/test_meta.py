"""LoRA metadata (core/meta.py, nodes/info.py): each tool's header and sidecar layout as the fixture generator writes
it (scripts/make_fixtures.py META_*), read by plain Python; then on the real ComfyUI server: the loader's
``trigger_words`` / ``loaded_loras`` outputs and the report's base-model warning in a queued prompt, and the info and
preview routes, which read nothing outside the loras folders (links included) and leak no server path."""
import json
import os
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest

import make_fixtures as fx
from batch_lora.core.meta import family_of_base, family_of_model, read_info
from comfy_server import ComfyServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    lora_dir = tmp_path_factory.mktemp("meta") / "loras"
    fx.make_metadata_loras(lora_dir)
    return lora_dir


def _everywhere(_real):
    return True


@pytest.mark.parametrize("name", sorted(fx.META_EXPECTED))
def test_each_tools_layout_is_read(loras, name):
    info = read_info(str(loras / name), _everywhere)
    assert (info.title, info.trigger_words, info.base_model, info.family) == fx.META_EXPECTED[name]
    if name in fx.META_PREVIEW_SIZE:
        from PIL import Image
        assert Image.open(info.preview).size == fx.META_PREVIEW_SIZE[name]
    else:
        assert info.preview is None


def test_edited_broken_and_refused_sidecars(loras, tmp_path):
    work = tmp_path / "loras"
    shutil.copytree(loras, work, symlinks=True)
    path = str(work / fx.META_CIVITAI)
    sidecar = work / "meta_civitai.civitai.info"
    data = json.loads(sidecar.read_text())
    data["trainedWords"] = ["edited"]
    sidecar.write_text(json.dumps(data))
    os.utime(sidecar, ns=(1, 1))  # an older mtime than before: the change time still says it changed
    assert read_info(path, _everywhere).trigger_words == ("edited",)
    sidecar.write_text("{not json")  # broken: ignored; the header's base model and output name remain
    info = read_info(path, _everywhere)
    assert (info.title, info.trigger_words, info.base_model) == ("civ_internal", (), "sd_v1")
    refused = read_info(str(work / fx.META_MANAGER), lambda real: not real.endswith((".json", ".webp")))
    assert (refused.title, refused.trigger_words, refused.preview) == (None, (), None)
    (work / "meta_manager.metadata.json").write_bytes(b" " * (5 << 20))  # oversized: ignored
    assert read_info(str(work / fx.META_MANAGER), _everywhere).trigger_words == ()


@pytest.mark.parametrize("text, family", [
    ("SD 1.5", "SD1.x"), ("sd_v1", "SD1.x"), ("stable-diffusion-v1/lora", "SD1.x"), ("SD 2.1", "SD2.x"),
    ("sdxl_base_v1-0", "SDXL"), ("SDXL 1.0", "SDXL"), ("Pony", "SDXL"), ("Illustrious", "SDXL"),
    ("stable-diffusion-3-medium/lora", "SD3"), ("SD 3.5 Large", "SD3"), ("Flux.1 D", "Flux.1"),
    ("flux-1-dev/lora", "Flux.1"), ("flux1", "Flux.1"), ("Flux.2 D", "Flux.2"), ("chroma/lora", "Chroma"),
    ("Wan Video 14B t2v", "Wan"), ("wan", "Wan"), ("hyv", "HunyuanVideo"), ("Hunyuan Video", "HunyuanVideo"),
    ("qwen_image", "Qwen-Image"), ("Qwen", "Qwen-Image"), ("LTXV", "LTXV"), ("lumina-2/lora", "Lumina 2"),
    ("z-image/lora", "Z-Image"), ("ZImageTurbo", "Z-Image"), ("HiDream", "HiDream"),
    ("Other", None), ("unknown", None), ("", None), (None, None)])
def test_base_model_families(text, family):
    assert family_of_base(text) == family


@pytest.mark.parametrize("cls, family", [
    ("SD15", "SD1.x"), ("SD20", "SD2.x"), ("SDXL", "SDXL"), ("SDXLRefiner", "SDXL"), ("SSD1B", "SDXL"),
    ("SD3", "SD3"), ("Flux", "Flux.1"), ("FluxSchnell", "Flux.1"), ("Flux2", "Flux.2"), ("Chroma", "Chroma"),
    ("WAN21_T2V", "Wan"), ("WAN22_T2V", "Wan"), ("QwenImage", "Qwen-Image"), ("HunyuanVideo", "HunyuanVideo"),
    ("LTXV", "LTXV"), ("Lumina2", "Lumina 2"), ("ZImage", "Z-Image"), ("HiDream", "HiDream"), ("SD1ClipModel", None)])
def test_model_class_families(cls, family):
    assert family_of_model(cls) == family


# ---------------------------------------------------------------------------------------------------------
# the real server

SECRET = "outside_secret_word"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server whose loras folder holds the META_* files and links that lead outside it: a LoRA, a sidecar and a
    preview image, each a link to a file in a folder next to the loras folder."""
    base = tmp_path_factory.mktemp("meta_server")
    fx.make_fixtures(base)
    lora_dir = base / "models" / "loras"
    fx.make_metadata_loras(lora_dir)
    outside = base / "outside"
    outside.mkdir()
    shutil.copyfile(lora_dir / fx.LORA_KOHYA_A, outside / "hidden.safetensors")
    (outside / "hidden.civitai.info").write_text(json.dumps({"trainedWords": [SECRET]}))
    shutil.copyfile(lora_dir / "meta_civitai.preview.png", outside / "hidden.png")
    os.symlink(outside / "hidden.safetensors", lora_dir / "link_out.safetensors")
    shutil.copyfile(lora_dir / fx.LORA_KOHYA_A, lora_dir / "linked_sidecars.safetensors")
    os.symlink(outside / "hidden.civitai.info", lora_dir / "linked_sidecars.civitai.info")
    os.symlink(outside / "hidden.png", lora_dir / "linked_sidecars.preview.png")
    with ComfyServer(base) as srv:
        srv.base = base
        yield srv


def _prompt(rows: dict) -> dict:
    """Checkpoint -> Batch LoRA Loader (rows) -> PreviewAny of its report (node 10), trigger_words (11) and
    loaded_loras (12)."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fx.CHECKPOINT_NAME}},
            "2": {"class_type": "BatchLoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], **rows}},
            "10": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}},
            "11": {"class_type": "PreviewAny", "inputs": {"source": ["2", 5]}},
            "12": {"class_type": "PreviewAny", "inputs": {"source": ["2", 6]}}}


def _row(name, sm=1.0, sc=None, on=True):
    return {"on": on, "lora": name, "strength_model": sm, "strength_clip": sm if sc is None else sc}


@pytest.mark.server
def test_trigger_words_and_loaded_loras_from_a_prompt(server):
    rows = {"lora_1": _row(fx.META_CIVITAI, 0.8, 0.6), "lora_2": _row(fx.META_KOHYA, on=False),
            "lora_3": _row(fx.META_MANAGER, 0.5), "lora_4": _row(fx.META_SPEC, 0.3),
            "lora_5": {**_row(fx.META_KOHYA), "blocks": "SD-INALL"}}
    entry = server.queue(_prompt(rows))
    text = {nid: entry["outputs"][nid]["text"][0] for nid in ("10", "11", "12")}
    # row order, lora_2 off, "CIV_WORD" (meta_manager) a repeat of "civ_word" (meta_civitai)
    assert text["11"] == ("civ_word, civ phrase, extra, mgr_word, spec_trigger, second phrase, zxc style, outdoors, "
                          "blue sky")
    expected = [{"name": n, "strength_model": sm, "strength_clip": sc, "base_model": fx.META_EXPECTED[n][2],
                 "family": fx.META_EXPECTED[n][3], "trigger_words": list(fx.META_EXPECTED[n][1]), "row": row}
                for n, sm, sc, row in ((fx.META_CIVITAI, 0.8, 0.6, "lora_1"), (fx.META_MANAGER, 0.5, 0.5, "lora_3"),
                                       (fx.META_SPEC, 0.3, 0.3, "lora_4"), (fx.META_KOHYA, 1.0, 1.0, "lora_5"))]
    expected[-1]["blocks"] = "SD-INALL"
    assert json.loads(text["12"]) == expected
    report = text["10"].splitlines()
    notes = {line.split("  ")[0]: report[i + 1].strip() for i, line in enumerate(report) if line.startswith("meta_")}
    assert notes[fx.META_CIVITAI] == "trained for SD 1.5 (SD1.x)"
    assert notes[fx.META_KOHYA] == "trained for sd_v1 (SD1.x)"
    for name in (fx.META_MANAGER, fx.META_SPEC):
        base, family = fx.META_EXPECTED[name][2:]
        assert notes[name].startswith(f"WARNING: trained for {base} ({family}), but the loaded model is SD1.x (SD15)")
    assert "meta_manager.safetensors: trained for Flux.1 D (Flux.1), but the loaded model is SD1.x" in server.log_tail(100_000)


@pytest.mark.server
def test_edited_sidecar_reruns_the_node_with_new_trigger_words(server):
    rows = {"lora_1": _row(fx.META_CIVITAI)}
    assert server.queue(_prompt(rows))["outputs"]["11"]["text"] == ["civ_word, civ phrase, extra"]
    sidecar = server.base / "models" / "loras" / "meta_civitai.civitai.info"
    original = sidecar.read_text()
    try:
        sidecar.write_text(json.dumps({**json.loads(original), "trainedWords": ["renamed_word"]}))
        assert server.queue(_prompt(rows))["outputs"]["11"]["text"] == ["renamed_word"]
    finally:
        sidecar.write_text(original)


@pytest.mark.server
@pytest.mark.parametrize("name", sorted(fx.META_EXPECTED))
def test_info_and_preview_routes(server, name):
    doc = server.get(f"/batch_lora/info?lora={quote(name)}").json()
    title, words, base, family = fx.META_EXPECTED[name]
    assert {k: doc[k] for k in ("lora", "title", "trigger_words", "base_model", "family")} == {
        "lora": name, "title": title, "trigger_words": list(words), "base_model": base, "family": family}
    if name not in fx.META_PREVIEW_SIZE:
        assert doc["preview"] is None
        assert server.get(f"/batch_lora/preview?lora={quote(name)}").status_code == 404
        return
    image = server.get(doc["preview"])
    stem = name[:-len(".safetensors")]
    on_disk = next(p for p in (server.base / "models" / "loras").iterdir()
                   if p.name.startswith(stem + ".") and p.suffix in (".png", ".webp"))
    assert image.status_code == 200 and image.content == on_disk.read_bytes()
    assert image.headers["Content-Type"] == {".png": "image/png", ".webp": "image/webp"}[on_disk.suffix]


@pytest.mark.server
@pytest.mark.parametrize("name", ["../outside/hidden.safetensors", "link_out.safetensors", "/etc/passwd",
                                  "nothing_here.safetensors", "sub/../../outside/hidden.safetensors"])
def test_routes_refuse_names_outside_the_loras_folders(server, name):
    for route in ("info", "preview"):
        r = server.get(f"/batch_lora/{route}?lora={quote(name, safe='')}")
        assert r.status_code == 404, (route, name, r.text)
        error = r.json()["error"]
        assert str(server.base) not in error and "outside/hidden" not in error.replace(name, "")
    assert server.get("/batch_lora/info").status_code == 400


@pytest.mark.server
def test_sidecar_links_leading_outside_are_not_read(server):
    doc = server.get("/batch_lora/info?lora=linked_sidecars.safetensors").json()
    assert doc["trigger_words"] == [] and doc["preview"] is None
    assert server.get("/batch_lora/preview?lora=linked_sidecars.safetensors").status_code == 404
    entry = server.queue(_prompt({"lora_1": _row("linked_sidecars.safetensors")}))
    assert entry["outputs"]["11"]["text"] == [""]
    assert SECRET not in json.dumps(entry["outputs"])

"""The nodes inside the real ComfyUI host, in-process: merges against an independent fp32 oracle computed from
the files on disk and against stock ComfyUI's LoraLoader chain; exact reset; plain paths; in-place writes;
no work for an unchanged stack; bad LoRAs rejected with the model left bit-identical."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import make_fixtures as fx
from comfy_host import load, load_checkpoint, row, run_loader, same_weights, weights
from oracle import beyond_one_rounding, beyond_one_step, ulp

pytestmark = pytest.mark.host

A, B, C = fx.LORA_KOHYA_A, fx.LORA_KOHYA_B, fx.LORA_PEFT_C
MANIFEST = fx.lora_manifest()




def oracle(fixtures_dir, stack):
    """float64 ``base + sum s * alpha/r * up @ down`` per model key, read straight from the files on disk.

    stack: [(file name, strength_model, strength_clip)]. Returns {model key: (reference, operand magnitude)}."""
    ckpt = load_file(str(fixtures_dir / "models" / "checkpoints" / fx.CHECKPOINT_NAME))
    out = {}
    for name, sm, sc in stack:
        info = MANIFEST[name]
        tensors = load_file(str(fixtures_dir / "models" / "loras" / name))
        down_sfx, up_sfx = fx.factor_suffixes(info.style)
        for m in info.modules:
            if m.model_key not in out:
                base = ckpt[m.checkpoint_key].double()
                out[m.model_key] = [base.clone(), base.abs()]
            s = sm if m.model_key.startswith("diffusion_model.") else sc
            up = tensors[m.lora_name + up_sfx].double().flatten(1)
            down = tensors[m.lora_name + down_sfx].double()
            scale = (info.alpha / down.shape[0]) if info.alpha is not None else 1.0
            delta = (up @ down.flatten(1)).reshape(m.shape) * (s * scale)
            mag = (up.abs() @ down.abs().flatten(1)).reshape(m.shape) * abs(s * scale)
            out[m.model_key][0] += delta
            out[m.model_key][1] += mag
    return out


STACK = [(A, 0.8, 1.0), (C, 0.6, 0.5), (B, -0.7, 1.3)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_apply_matches_fp32_oracle_from_files(comfy_host, fixtures_dir, dtype):
    h = comfy_host
    model, clip = load_checkpoint(h, fx.CHECKPOINT_NAME, dtype)
    m2, c2, report = run_loader(h, model, clip, *(row(n, sm, sc) for n, sm, sc in STACK))
    with torch.inference_mode():
        load(h, m2, c2.load_model())
    ref = oracle(fixtures_dir, STACK)
    for key, (expected, mag) in ref.items():
        patcher = m2 if key.startswith("diffusion_model.") else c2.patcher
        live = patcher.model.get_parameter(key).detach()
        assert beyond_one_rounding(live, expected, mag) == 0, key
    assert report.startswith("model: eager; clip: eager\n")
    assert f"{A}  model 0.8 clip 1  unet 14 keys, clip 48 keys, 0 unmatched" in report
    assert report.count("0 unmatched") == 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_agrees_with_stock_loraloader_chain(comfy_host, fixtures_dir, dtype, capsys):
    h = comfy_host
    operands = {k: mag for k, (_, mag) in oracle(fixtures_dir, STACK).items()}
    model, clip = load_checkpoint(h, fx.CHECKPOINT_NAME, dtype)
    keys_u = sorted(set().union(*(MANIFEST[n].model_keys for n, _, _ in STACK)))
    stock_m, stock_c = model, clip
    for name, sm, sc in STACK:
        stock_m, stock_c = h.nodes.LoraLoader().load_lora(stock_m, stock_c, name, sm, sc)
    with torch.inference_mode():
        load(h, stock_m, stock_c.load_model())
        stock = {k: (stock_m if k.startswith("diffusion_model.") else stock_c.patcher).model.get_parameter(k).detach().clone()
                 for k in keys_u}
        ours_m, ours_c, _ = run_loader(h, model, clip, *(row(n, sm, sc) for n, sm, sc in STACK))
        load(h, ours_m, ours_c.load_model())
    total = identical = 0
    for key in keys_u:
        live = (ours_m if key.startswith("diffusion_model.") else ours_c.patcher).model.get_parameter(key).detach()
        s = stock[key]
        total += s.numel()
        identical += int((live == s).sum())
        # Same operands, different summation order (one fused matmul vs one matmul per LoRA): at most one
        # rounding step of the result apart, plus fp32 accumulation error measured against the operands.
        assert beyond_one_step(live, s, operands[key]) == 0, key
    with capsys.disabled():
        print(f"\n[{dtype}] vs stock LoraLoader chain: {identical}/{total} elements identical "
              f"({100 * identical / total:.2f}%), the rest within one rounding step")
    assert identical / total > (0.95 if dtype == torch.float16 else 0.5)


def test_reset_plain_path_and_in_place_writes(comfy_host):
    h = comfy_host
    model, clip = load_checkpoint(h, fx.CHECKPOINT_NAME, torch.float16)
    fresh_model, fresh_clip = load_checkpoint(h, fx.CHECKPOINT_NAME, torch.float16)
    with torch.inference_mode():
        load(h, fresh_model, fresh_clip.load_model())
        base_u, base_c = weights(fresh_model), weights(fresh_clip.patcher)
        del fresh_model, fresh_clip
        params = {k: (p, p.data_ptr()) for k, p in model.model.named_parameters()}
        load(h, model, clip.load_model())
        own_u = weights(model, list(params))  # every parameter, including ones a fresh load leaves uninitialised
        own_c = weights(clip.patcher, [k for k, _ in clip.patcher.model.named_parameters()])
        lora_m, lora_c, _ = run_loader(h, model, clip, row(A, 1.0, 1.0), row(C, 0.5, 0.7))
        load(h, lora_m, lora_c.load_model())
        touched = MANIFEST[A].model_keys | MANIFEST[C].model_keys
        assert all(not torch.equal(lora_m.model.get_parameter(k), base_u[k]) for k in touched if k in base_u)
        load(h, model, clip.load_model())  # plain path right after the LoRA path
        assert same_weights(model, base_u)
        assert same_weights(clip.patcher, base_c)
        load(h, lora_m, lora_c.load_model())
        reset_m, reset_c = h.pack.ResetAdapters().reset(False, lora_m, lora_c)
        load(h, reset_m, reset_c.load_model())
        assert same_weights(reset_m, base_u)
        assert same_weights(reset_c.patcher, base_c)
        assert same_weights(reset_m, own_u, list(own_u))
        assert same_weights(reset_c.patcher, own_c, list(own_c))
        for k, p in model.model.named_parameters():
            assert p is params[k][0] and p.data_ptr() == params[k][1], k


def test_unchanged_stack_costs_nothing_and_edit_rebakes_only_touched(comfy_host):
    h = comfy_host
    from batch_lora.nodes.lifecycle import engine_for
    model, clip = load_checkpoint(h, fx.CHECKPOINT_NAME, torch.float16)
    with torch.inference_mode():
        m1, _, _ = run_loader(h, model, None, row(A, 0.8), row(C, 0.6))
        load(h, m1)
        engine = engine_for(model.model, create=False)
        first = (engine.counters.merges, engine.counters.writes)
        assert first[0] == len(MANIFEST[A].model_keys | MANIFEST[C].model_keys) - 96 // 2 * 0 - sum(
            1 for k in MANIFEST[A].model_keys | MANIFEST[C].model_keys if not k.startswith("diffusion_model."))
        m1_again, _, _ = run_loader(h, model, None, row(A, 0.8), row(C, 0.6))  # node re-executes: new clone
        assert m1_again.patches_uuid == m1.patches_uuid
        load(h, m1_again)
        load(h, m1)
        assert (engine.counters.merges, engine.counters.writes) == first
        edited, _, _ = run_loader(h, model, None, row(A, 0.8), row(C, 0.4))
        load(h, edited)
        touched = len({k for k in MANIFEST[A].model_keys | MANIFEST[C].model_keys if k.startswith("diffusion_model.")})
        assert engine.counters.merges == first[0] + touched
        assert engine.counters.writes == first[1] + touched
        # A strength_model edit leaves the text encoder alone, and the reverse; --cpu never moves a weight.
        m2, c2, _ = run_loader(h, model, clip, row(A, 0.8, 1.0))
        load(h, m2, c2.load_model())
        clip_engine = engine_for(clip.patcher.model, create=False)
        clip_first = clip_engine.counters.merges
        m3, c3, _ = run_loader(h, model, clip, row(A, 0.5, 1.0))
        assert c3.patcher.patches_uuid == c2.patcher.patches_uuid
        load(h, m3, c3.load_model())
        assert clip_engine.counters.merges == clip_first
        m4, c4, _ = run_loader(h, model, clip, row(A, 0.5, 0.3))
        merges = engine.counters.merges
        assert m4.patches_uuid == m3.patches_uuid
        load(h, m4, c4.load_model())
        assert engine.counters.merges == merges
        assert clip_engine.counters.merges == clip_first + len(MANIFEST[A].model_keys) - sum(
            1 for k in MANIFEST[A].model_keys if k.startswith("diffusion_model."))
        assert engine.counters.moves == clip_engine.counters.moves == 0


def test_switch_writes_each_key_once_and_equals_a_fresh_bake(comfy_host):
    """A -> B on the classic patcher: ComfyUI restores nothing (the stacks share a uuid); the keys of B are baked
    from the base and the keys that leave the stack are restored, each with one write; the weights equal B baked on
    a fresh model, bit for bit, and a plain path after it is the exact base."""
    h = comfy_host
    from batch_lora.nodes.lifecycle import engine_for
    model, clip = load_checkpoint(h, fx.CHECKPOINT_NAME, torch.float16)
    fresh, fresh_clip = load_checkpoint(h, fx.CHECKPOINT_NAME, torch.float16)

    def changes(before, after, unet):
        """(keys to bake, keys to restore) going from stack ``before`` to ``after`` ([(file, strength)])."""
        def terms(stack):
            out = {}
            for name, s in stack:
                for k in MANIFEST[name].model_keys:
                    if k.startswith("diffusion_model.") == unet:
                        out.setdefault(k, []).append((name, s))
            return out
        old, new = terms(before), terms(after)
        return {k for k, t in new.items() if old.get(k) != t}, set(old) - set(new)

    unet_bake, unet_gone = changes([(A, 0.8), (B, -0.7), (C, 0.6)], [(A, 0.8)], True)
    clip_bake, clip_gone = changes([(A, 1.0), (B, 1.3), (C, 0.5)], [(A, 0.4)], False)
    assert unet_bake and unet_gone and clip_bake and clip_gone  # the fixtures exercise every case
    with torch.inference_mode():
        load(h, model, clip.load_model())
        base_u, base_c = weights(model), weights(clip.patcher)
        a_m, a_c, _ = run_loader(h, model, clip, row(A, 0.8, 1.0), row(B, -0.7, 1.3), row(C, 0.6, 0.5))
        load(h, a_m, a_c.load_model())
        engine, clip_engine = engine_for(model.model, create=False), engine_for(clip.patcher.model, create=False)
        before = [(e.counters.merges, e.counters.writes, e.counters.host_restores) for e in (engine, clip_engine)]
        b_m, b_c, _ = run_loader(h, model, clip, row(A, 0.8, 0.4))
        assert b_m.patches_uuid == a_m.patches_uuid
        load(h, b_m, b_c.load_model())
        after = [(e.counters.merges, e.counters.writes, e.counters.host_restores) for e in (engine, clip_engine)]
        assert after[0][:2] == (before[0][0] + len(unet_bake), before[0][1] + len(unet_bake) + len(unet_gone))
        assert after[1][:2] == (before[1][0] + len(clip_bake), before[1][1] + len(clip_bake) + len(clip_gone))
        assert after[0][2] == before[0][2] and after[1][2] == before[1][2]  # ComfyUI restored nothing
        switched_u, switched_c = weights(b_m), weights(b_c.patcher)
        f_m, f_c, _ = run_loader(h, fresh, fresh_clip, row(A, 0.8, 0.4))
        load(h, f_m, f_c.load_model())
        assert all(torch.equal(switched_u[k], v) for k, v in weights(f_m).items())
        assert all(torch.equal(switched_c[k], v) for k, v in weights(f_c.patcher).items())
        load(h, model, clip.load_model())
        assert same_weights(model, base_u) and same_weights(clip.patcher, base_c)


def test_bad_loras_rejected_and_model_left_bit_identical(comfy_host, fixtures_dir):
    h = comfy_host
    from batch_lora.core import FuseError, LoraFileError
    loras = fixtures_dir / "models" / "loras"
    bad = load_file(str(loras / A))
    first = next(k for k in sorted(bad) if k.endswith(".lora_up.weight"))
    bad[first] = bad[first].clone()
    bad[first][0, 0] = float("nan")
    save_file(bad, str(loras / "nan_lora.safetensors"))
    # Finite factors whose product overflows fp16 (|delta| ~ 1e6 x the weights): only visible while baking.
    huge = {k: v.float() * (1000.0 if k.endswith("weight") else 1.0) for k, v in load_file(str(loras / A)).items()}
    save_file(huge, str(loras / "overflow_lora.safetensors"))
    h.folder_paths.filename_list_cache.pop("loras", None)
    model, clip = load_checkpoint(h, fx.CHECKPOINT_NAME, torch.float16)
    with torch.inference_mode():
        good_m, good_c, _ = run_loader(h, model, clip, row(C, 0.5, 0.5))
        load(h, good_m, good_c.load_model())
        before_u, before_c = weights(good_m), weights(good_c.patcher)
        with pytest.raises(LoraFileError, match=f"nan_lora.safetensors.*{first}.*NaN"):
            run_loader(h, good_m, good_c, row("nan_lora.safetensors"))
        with pytest.raises(LoraFileError, match="missing.safetensors"):
            run_loader(h, good_m, good_c, row("missing.safetensors"))
        with pytest.raises(ValueError, match="lora_1.strength_model"):
            run_loader(h, good_m, good_c, row(A, float("inf")))
        assert same_weights(good_m, before_u)
        # A result that overflows fp16 is only seen while baking: the load fails and nothing stays half-patched.
        huge_m, _, _ = run_loader(h, good_m, None, row("overflow_lora.safetensors", 5.0))
        with pytest.raises(FuseError, match="NaN/Inf"):
            load(h, huge_m)
        load(h, good_m, good_c.load_model())
        assert same_weights(good_m, before_u)
        assert same_weights(good_c.patcher, before_c)


def test_chained_loaders_and_lora_stack_equal_one_loader(comfy_host):
    h = comfy_host
    model, clip = load_checkpoint(h, fx.CHECKPOINT_NAME, torch.float16)
    with torch.inference_mode():
        one_m, one_c, _ = run_loader(h, model, clip, row(A, 0.8, 1.0), row(C, 0.6, 0.5))
        load(h, one_m, one_c.load_model())
        expected_u, expected_c = weights(one_m), weights(one_c.patcher)
        mid_m, mid_c, _ = run_loader(h, model, clip, row(A, 0.8, 1.0))
        two_m, two_c, _ = run_loader(h, mid_m, mid_c, row(C, 0.6, 0.5))
        assert len(two_m.get_injections("batch_lora")) == 1 and not model.get_injections("batch_lora")  # one hook
        load(h, two_m, two_c.load_model())
        assert same_weights(two_m, expected_u)
        stack_m, stack_c, _ = run_loader(h, model, clip, row(C, 0.6, 0.5), lora_stack=[(A, 0.8, 1.0)])
        load(h, stack_m, stack_c.load_model())
        assert same_weights(stack_m, expected_u)
        assert same_weights(stack_c.patcher, expected_c)


def test_reset_with_free_cache_releases_base_copies(comfy_host):
    h = comfy_host
    from batch_lora.nodes.lifecycle import engine_for
    from batch_lora.nodes.stack import FILES
    model, clip = load_checkpoint(h, fx.CHECKPOINT_NAME, torch.float16)
    with torch.inference_mode():
        load(h, model)
        base = weights(model)
        lora_m, _, _ = run_loader(h, model, None, row(A, 0.8), row(C, 0.6))
        load(h, lora_m)
        applied = weights(lora_m)
        engine = engine_for(model.model, create=False)
        touched = {k for k in MANIFEST[A].model_keys | MANIFEST[C].model_keys if k.startswith("diffusion_model.")}
        assert engine.cache.nbytes == sum(base[k].numel() * 4 for k in touched)  # fp32 copies of touched keys only
        reset_m, _ = h.pack.ResetAdapters().reset(True, lora_m, None)
        assert FILES.nbytes == 0
        load(h, reset_m)
        assert engine.cache.nbytes == 0 and engine.applied_keys == set()
        assert same_weights(reset_m, base)
        again, _, _ = run_loader(h, model, None, row(A, 0.8), row(C, 0.6))  # re-reads files, re-captures bases
        load(h, again)
        assert same_weights(again, applied)


def test_frozen_compile_is_refused_with_node_and_key(comfy_host):
    h = comfy_host
    from batch_lora.core import UnsupportedTarget
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    model, _ = load_checkpoint(h, fx.CHECKPOINT_NAME, torch.float16)
    plain_compile = model.clone()
    set_torch_compile_wrapper(plain_compile, backend="inductor")  # what ComfyUI's TorchCompileModel does
    report = h.pack.BatchLoraLoader().apply(plain_compile, None, lora_1=row(A))[2]
    assert report.startswith("model: torch.compile(inductor)\n")
    compiled = model.clone()
    set_torch_compile_wrapper(compiled, backend="inductor", options={"freezing": True})
    with pytest.raises(UnsupportedTarget, match=r"Batch LoRA Loader \(node 7\): .*freezing.*diffusion_model\..*"
                                                 r"Compile without freezing"):
        h.pack.BatchLoraLoader().apply(compiled, None, unique_id="7", lora_1=row(A))
    # Loader first, freezing compile after it: refused when the weights would be written.
    lora_m = h.pack.BatchLoraLoader().apply(model, None, unique_id="8", lora_1=row(A))[0]
    later = lora_m.clone()
    set_torch_compile_wrapper(later, backend="inductor", options={"freezing": True})
    with torch.inference_mode():
        load(h, model)
        base = weights(model)
        with pytest.raises(UnsupportedTarget, match=r"node 8"):
            load(h, later)
        load(h, model)
        assert same_weights(model, base)


def test_base_cache_options_native_dtype_and_budget(comfy_host, monkeypatch):
    h = comfy_host
    from batch_lora.core import CacheBudgetError
    from batch_lora.nodes.lifecycle import engine_for
    touched = {k for k in MANIFEST[A].model_keys if k.startswith("diffusion_model.")}
    monkeypatch.setenv("BATCH_LORA_BASE_CACHE", "native")
    model, _ = load_checkpoint(h, fx.CHECKPOINT_NAME, torch.float16)
    with torch.inference_mode():
        load(h, model)
        base = weights(model)
        lora_m, _, _ = run_loader(h, model, None, row(A, 0.8))
        load(h, lora_m)
        assert engine_for(model.model, create=False).cache.nbytes == sum(base[k].numel() * 2 for k in touched)
        load(h, model)
        assert same_weights(model, base)
    monkeypatch.setenv("BATCH_LORA_BASE_CACHE_BUDGET_MB", "0.5")
    model, _ = load_checkpoint(h, fx.CHECKPOINT_NAME, torch.float16)
    with torch.inference_mode():
        load(h, model)
        base = weights(model)
        lora_m, _, _ = run_loader(h, model, None, row(A, 0.8))
        with pytest.raises(CacheBudgetError, match="budget of 524288 bytes exceeded while caching diffusion_model"):
            load(h, lora_m)
        load(h, model)
        assert same_weights(model, base)


def test_stock_patch_on_the_same_keys_composes_and_restores(comfy_host, fixtures_dir):
    """Stock LoraLoader (A) then this pack (C) on overlapping keys: base + A + C (one extra rounding on the
    shared keys); then the plain model and the stock-only model get exactly their own weights back."""
    h = comfy_host
    model, clip = load_checkpoint(h, fx.CHECKPOINT_NAME, torch.float16)
    with torch.inference_mode():
        load(h, model)
        base = weights(model)
        stock_m, _ = h.nodes.LoraLoader().load_lora(model, None, A, 0.5, 0.0)
        load(h, stock_m)
        stock_only = weights(stock_m)
        both_m, _, _ = run_loader(h, stock_m, None, row(C, 0.6))
        load(h, both_m)
        ref = oracle(fixtures_dir, [(A, 0.5, 0.0), (C, 0.6, 0.0)])
        ref_a = oracle(fixtures_dir, [(A, 0.5, 0.0)])
        for key in MANIFEST[A].model_keys & MANIFEST[C].model_keys:
            if key.startswith("diffusion_model."):
                live = both_m.model.get_parameter(key).detach().double()
                exact, operands = ref[key]
                # Two roundings, one step each at most: ComfyUI rounds base + A, then this pack rounds that + C.
                bound = ulp(ref_a[key][0], torch.float16) + ulp(exact, torch.float16) + 64 * 2.0**-24 * operands
                assert bool(((live - exact).abs() <= bound).all()), key
        load(h, model)
        assert same_weights(model, base)
        load(h, both_m)
        load(h, stock_m)
        assert same_weights(stock_m, stock_only)
        # The pack alone again: its base on the shared keys is the plain weight, not the stock-patched one.
        load(h, both_m)
        alone_m, _, _ = run_loader(h, model, None, row(C, 0.6))
        load(h, alone_m)
        ref_c = oracle(fixtures_dir, [(C, 0.6, 0.0)])
        for key, (exact, operands) in ref_c.items():
            if key.startswith("diffusion_model."):
                assert beyond_one_rounding(alone_m.model.get_parameter(key).detach(), exact, operands) == 0, key

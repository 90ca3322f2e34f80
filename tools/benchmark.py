"""Side-by-side speed and memory benchmarks; every figure is a ratio measured in one run on one machine.

Usage:

    python tools/benchmark.py --quick --output outputs/benchmark.json

Each timing is the median of `--repeats` runs after a warm-up, and the two sides of a ratio alternate (A B A B)
so that drift in the machine's speed cancels. Writes JSON (keys below, each a number) and a markdown table next
to it (`.md`) with the machine and library versions.

- `train_step_memory_ratio[_tiny|_b16]`: training step (forward + backward + AdamW; encoder output given) with
  prototype memory on ÷ off, for the tiny decoder and one of the vit-b16 preset's width/depth.
- `refresh_share`: refresh time ÷ (refresh time + `memory_refresh_every` training steps), tiny preset;
  `kmeans_faiss_s` and `kmeans_torch_s`: one K-Means of that preset's full bank.
- `generate_memory_ratio_greedy[_tiny|_b16]`, `generate_memory_ratio_beam5[_tiny|_b16]`: captioning time (batch
  8, 20 tokens) with memory ÷ without, for the same two decoders (the b16 one in a full run only).
- `generate_vs_ved_ratio_b1`, `generate_vs_ved_ratio_b32`: our captions per second ÷ transformers'
  `VisionEncoderDecoderModel` (ViT + GPT-2 of the same width, depth, heads, vocabulary and image size, random
  weights, same batch, beams and length, both with a KV cache). `..._unmerged`: the same with our tower's LoRA
  left unmerged, as during training. `encoder_vs_vit_time_ratio_b1|b32`: the time of our encoder (tower, dense
  patch embeddings, quantisation, interaction layers) ÷ the ViT's, for the same images;
  `encoder_share_{tower,dense,quantize,interaction}_b32`: each stage's share of our encoder's time (timed alone),
  and `tower_vs_vit_time_ratio_b32`: our tower's blocks ÷ the peer's whole ViT.
- `feature_cache_speedup[_b16]`: training-epoch time from PNG-encoded synthetic images (decoded and preprocessed
  in the step) ÷ from the feature cache's shards, LoRA from the middle block, for the preset and (full run) for the
  vit-b16 preset (random weights, batch 4); `feature_cache_bound[_b16]`: the speed-up if the pixel path cost only
  the parts the cache removes (decoding and preprocessing, frozen blocks, pseudo-labels, each timed alone) plus
  the cached step; `feature_cache_efficiency[_b16]` = speed-up ÷ bound.
- `peak_rss_memory_ratio`: peak resident memory of a training process with memory on ÷ off.
- `memory_macs_ratio_tiny`, `memory_macs_ratio_b16`: not a timing: the decoder's multiply-adds per caption token
  with memory ÷ without, counted from the config: what the memory costs if every multiply-add takes the same time
  (its one large matmul can run faster than that, the many small operations around it slower).

Captioning is timed on the model as released: `train.py` (`save_release`) and `push_to_hub.py` merge the
tower's LoRA into its weights before saving.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
import transformers

from modeling_fsgr_pma import FsgrPmaConfig, FsgrPmaForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (under 3 minutes on 2 cores)")
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmark.json"))
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 7, quick 5)")
    parser.add_argument("--model-config", type=Path, default=ROOT / "configuration/model/tiny.json",
                        help="preset measured (the tests pass a smaller one)")
    parser.add_argument("--rss-probe", choices=["on", "off"], help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (5 if args.quick else 7)
    return args


# ----------------------------------------------------------------------------------------------------------------
# Timing
def paired_medians(run_a, run_b, repeats: int) -> tuple[float, float]:
    """Median seconds of two callables, timed alternately after one warm-up each."""
    run_a(), run_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        for run, times in ((run_a, times_a), (run_b, times_b)):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


def median_time(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------------------------
# Models
def preset(path: Path, **overrides) -> FsgrPmaConfig:
    config = FsgrPmaConfig.from_json_file(path)
    return FsgrPmaConfig(**{**config.to_dict(), "dropout": 0.0, **overrides})


def model_with_prototypes(config: FsgrPmaConfig) -> FsgrPmaForConditionalGeneration:
    """A model whose prototypes are set (random unit-scale values), so memory attention is active."""
    torch.manual_seed(0)
    model = FsgrPmaForConditionalGeneration(config)
    for layer in model.memory_layers():
        layer.prototype_keys.normal_()
        layer.prototype_values.normal_()
        layer.prototype_ready.fill_(True)
    return model


def memory_on_and_off(config: FsgrPmaConfig) -> tuple[FsgrPmaForConditionalGeneration, FsgrPmaForConditionalGeneration]:
    """The model with prototypes set, and the same weights without prototype memory (`use_memory=False`)."""
    on = model_with_prototypes(config)
    off = FsgrPmaForConditionalGeneration(FsgrPmaConfig(**{**config.to_dict(), "use_memory": False}))
    off.load_state_dict(on.state_dict(), strict=False)
    return on, off


def released(model: FsgrPmaForConditionalGeneration) -> FsgrPmaForConditionalGeneration:
    """The model as `save_release` writes it: LoRA merged into the tower, eval mode."""
    if model.config.lora_rank > 0 and not model.config.lora_merged:
        model.merge_encoder_lora()
    return model.eval()


def decoder_batch(config: FsgrPmaConfig, batch: int, length: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (batch, length), generator=generator)
    ids[:, 0] = config.bos_token_id
    return {"input_ids": ids, "labels": ids}


def train_step_fn(model: FsgrPmaForConditionalGeneration, inputs: dict, steps: int = 1):
    """A callable running `steps` training steps: timing several per sample steadies a step of a few ms."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def run():
        for _ in range(steps):
            loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def encoder_given_inputs(model: FsgrPmaForConditionalGeneration, config: FsgrPmaConfig, batch: int, length: int):
    """Decoder-side training inputs with a fixed encoder output (the encoder's cost is left out)."""
    pixel_values = torch.randn(batch, 3, config.image_size, config.image_size)
    with torch.no_grad():
        encoded = model.eval().get_encoder()(pixel_values=pixel_values)
    return {"encoder_outputs": encoded, **decoder_batch(config, batch, length)}


# ----------------------------------------------------------------------------------------------------------------
# Benchmarks
def bench_train_step(config: FsgrPmaConfig, batch: int, length: int, repeats: int) -> float:
    on, off = memory_on_and_off(config)
    inputs_on = encoder_given_inputs(on, config, batch, length)
    inputs_off = {**inputs_on}
    time_on, time_off = paired_medians(train_step_fn(on, inputs_on, 10), train_step_fn(off, inputs_off, 10), repeats)
    return time_on / time_off


def memory_macs_ratio(config: FsgrPmaConfig, length: int = 20) -> float:
    """Decoder multiply-adds per caption token with prototype memory ÷ without: the memory's share of the arithmetic.

    Per layer and token: self-attention projections 4d², scores and reads over the ~length/2 earlier tokens, the
    cross-attention's query and output projections 2d², its scores and reads over the N encoder tokens, the
    encoder tokens' keys and values 2Nd² shared by the caption's `length` tokens, the MLP 2d·d_ff; once per
    token the LM head d·V. The memory adds scores and reads over m prototypes, 2md per layer.
    """
    d, m = config.hidden_size, config.num_prototypes
    encoder_tokens = config.num_patches + (config.concept_top_k if config.use_concept_tokens else 0)
    per_layer = (
        4 * d * d + 2 * (length / 2) * d
        + 2 * d * d + 2 * encoder_tokens * d + 2 * encoder_tokens * d * d / length
        + 2 * d * config.intermediate_size
    )
    without = config.num_hidden_layers * per_layer + d * config.vocab_size
    return (without + config.num_hidden_layers * 2 * m * d) / without


def decoder_step_flops(config: FsgrPmaConfig, batch: int, length: int, memory: bool, encoder_width: int = 0) -> float:
    """Floating-point operations of one decoder training step (encoder output given), counted from the shapes.

    Forward multiply-adds per caption token and layer: self-attention projections 4d², scores and reads over the
    `length` keys (and the m prototypes with `memory`) 2(length [+ m])d, cross-attention query and output 2d², its
    scores and reads over the N encoder tokens 2Nd, the MLP 2d·d_ff; per image and layer the encoder tokens' keys
    and values 2Nd²; per token the LM head dV; with `encoder_width`, a projection of the encoder tokens to d first
    (VisionEncoderDecoder's `enc_to_dec_proj`). Every position is counted over the whole sequence, as the fused
    attention computes it. FLOPs = 2 × multiply-adds, and a training step is 3 × its forward (backward ≈ 2 ×).
    """
    d, tokens = config.hidden_size, config.num_patches + 1 if encoder_width else config.num_patches
    keys = length + (config.num_prototypes if memory else 0)
    per_token = 4 * d * d + 2 * keys * d + 2 * d * d + 2 * tokens * d + 2 * d * config.intermediate_size
    per_image = config.num_hidden_layers * 2 * tokens * d * d + tokens * encoder_width * d
    macs = batch * length * (config.num_hidden_layers * per_token + d * config.vocab_size) + batch * per_image
    return 3 * 2 * macs


def matmul_flops_per_second(repeats: int, size: int = 2048) -> float:
    """The machine's dense float32 matmul rate: a square `torch.mm` of `size`, FLOPs ÷ median seconds."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / median_time(lambda: torch.mm(a, b), repeats)


def bench_flops_utilisation(config: FsgrPmaConfig, repeats: int, batch: int = 32, length: int = 20) -> dict:
    """Our decoder's and VisionEncoderDecoder's GPT-2 decoder's training step: analytic FLOPs ÷ time ÷ matmul rate."""
    from transformers.modeling_outputs import BaseModelOutput

    steps = 2  # per timed sample
    ours = model_with_prototypes(config)
    step_ours = train_step_fn(ours, encoder_given_inputs(ours, config, batch, length), steps)
    peer = ved_baseline(config).train()
    peer_inputs = decoder_batch(config, batch, length)
    encoded = BaseModelOutput(last_hidden_state=torch.randn(batch, config.num_patches + 1, config.vision_width))
    optimizer = torch.optim.AdamW([p for p in peer.parameters() if p.requires_grad], lr=1e-4)

    def step_peer():
        for _ in range(steps):
            peer(encoder_outputs=encoded, decoder_input_ids=peer_inputs["input_ids"], labels=peer_inputs["labels"]).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    rate = matmul_flops_per_second(repeats)
    time_ours, time_peer = paired_medians(step_ours, step_peer, repeats)
    flops_ours = steps * decoder_step_flops(config, batch, length, memory=config.use_memory)
    flops_peer = steps * decoder_step_flops(config, batch, length, memory=False, encoder_width=config.vision_width)
    return {
        "matmul_gflops": rate / 1e9,
        "train_step_flops_utilisation_b16": flops_ours / time_ours / rate,
        "train_step_flops_utilisation_b16_ved": flops_peer / time_peer / rate,
    }


def bench_refresh(config: FsgrPmaConfig, repeats: int) -> dict:
    model = model_with_prototypes(config)
    layers = model.memory_layers()
    bank = torch.randn(config.memory_bank_size, config.hidden_size)
    for layer in layers:
        layer.bank_keys, layer.bank_values = bank.clone(), bank.clone()
        layer.bank_filled = config.memory_bank_size
    result = {}
    for backend in ("faiss", "torch"):
        result[f"kmeans_{backend}_s"] = median_time(lambda: model.refresh_memory(seed=0, backend=backend), repeats)
        result[f"kmeans_{backend}_s"] /= len(layers)
    step = train_step_fn(model, {**encoder_given_inputs(model, config, 32, 20)})
    step_time = median_time(step, repeats)
    refresh_time = result["kmeans_faiss_s"] * len(layers)
    result["refresh_share"] = refresh_time / (refresh_time + config.memory_refresh_every * step_time)
    return result


def bench_generate_memory(config: FsgrPmaConfig, repeats: int) -> dict:
    on, off = (released(model) for model in memory_on_and_off(config))
    pixel_values = torch.randn(8, 3, config.image_size, config.image_size)
    result = {}
    for name, beams in (("greedy", 1), ("beam5", 5)):
        kwargs = {"num_beams": beams, "max_new_tokens": 20, "min_new_tokens": 20}

        def run(model, kwargs=kwargs):
            with torch.inference_mode():
                model.generate(pixel_values=pixel_values, **kwargs)

        time_on, time_off = paired_medians(lambda: run(on), lambda: run(off), repeats)
        result[f"generate_memory_ratio_{name}"] = time_on / time_off
    return result


def ved_baseline(config: FsgrPmaConfig):
    """transformers' VisionEncoderDecoderModel with a ViT and a GPT-2 sized like our tower and decoder."""
    from transformers import GPT2Config, ViTConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    vision = config.vision_cfg
    vit = ViTConfig(
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_size=config.vision_width,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_width // vision.get("head_width", 64),
        intermediate_size=int(config.vision_width * vision.get("mlp_ratio", 4.0)),
    )
    gpt2 = GPT2Config(
        vocab_size=config.vocab_size,
        n_embd=config.hidden_size,
        n_layer=config.num_hidden_layers,
        n_head=config.num_attention_heads,
        n_inner=config.intermediate_size,
        n_positions=config.max_position_embeddings,
        add_cross_attention=True,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )
    ved_config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(vit, gpt2)
    ved_config.decoder_start_token_id = config.bos_token_id
    ved_config.pad_token_id = config.pad_token_id
    torch.manual_seed(0)
    return VisionEncoderDecoderModel(config=ved_config).eval()


def bench_vs_ved(config: FsgrPmaConfig, repeats: int) -> dict:
    unmerged = model_with_prototypes(config).eval()
    ours = released(model_with_prototypes(config))
    theirs = ved_baseline(config)
    result = {}
    for batch in (1, 32):
        pixel_values = torch.randn(batch, 3, config.image_size, config.image_size)
        kwargs = {"num_beams": 3, "max_new_tokens": 20, "min_new_tokens": 20, "use_cache": True}

        def run(model, pixel_values=pixel_values, kwargs=kwargs):
            with torch.inference_mode():
                model.generate(pixel_values=pixel_values, pad_token_id=config.pad_token_id, **kwargs)

        for name, model in (("", ours), ("_unmerged", unmerged)):
            time_ours, time_theirs = paired_medians(partial(run, model), partial(run, theirs), repeats)
            result[f"generate_vs_ved_ratio_b{batch}{name}"] = time_theirs / time_ours  # captions/s ours ÷ theirs

        def encode(encoder, pixel_values=pixel_values):
            with torch.inference_mode():
                encoder(pixel_values=pixel_values)

        encoders = partial(encode, ours.get_encoder()), partial(encode, theirs.encoder)
        time_ours, time_vit = paired_medians(*encoders, repeats)
        result[f"encoder_vs_vit_time_ratio_b{batch}"] = time_ours / time_vit
        if batch == 32:
            result.update(encoder_parts(ours, theirs, pixel_values, repeats))
    return result


def encoder_parts(ours, theirs, pixel_values: torch.Tensor, repeats: int) -> dict:
    """Where our released encoder's time goes at this batch: each stage timed alone on its inputs, as a share of
    their sum, and our tower (embedding + every block) against the VED peer's whole ViT."""
    encoder, batch = ours.get_encoder(), pixel_values.shape[0]
    with torch.inference_mode():
        tower = encoder.tower
        prefix = tower.frozen_prefix(pixel_values)
        _, last_input = tower.adapted_blocks(prefix)
        patches, _, global_embedding, dense = encoder.encode_image(prefix)
        language = encoder.quantize(dense, global_embedding)[0]
        parts = {
            "tower": lambda: tower.adapted_blocks(tower.frozen_prefix(pixel_values)),
            "dense": lambda: tower.dense_embeddings(last_input, patches.shape[1]),
            "quantize": lambda: encoder.quantize(dense, global_embedding),
            "interaction": lambda: encoder.cross_attend(patches, language),
        }
        times = {name: median_time(run, repeats) for name, run in parts.items()}
        time_tower, time_vit = paired_medians(parts["tower"], lambda: theirs.encoder(pixel_values=pixel_values), repeats)
    total = sum(times.values())
    result = {f"encoder_share_{name}_b{batch}": seconds / total for name, seconds in times.items()}
    result[f"tower_vs_vit_time_ratio_b{batch}"] = time_tower / time_vit
    return result


def synthetic_png_batches(config: FsgrPmaConfig, batches: int, batch: int) -> list[list[bytes]]:
    """PNG bytes of synthetic-world scenes at the preset's image size, as a training loader reads them."""
    import io

    import numpy as np

    from modeling_fsgr_pma.data.synthetic import domain_spec, render_scene, sample_scene

    spec, rng = domain_spec("synthetic"), np.random.default_rng(0)
    result = []
    for _ in range(batches):
        encoded = []
        for _ in range(batch):
            buffer = io.BytesIO()
            render_scene(sample_scene(spec, rng, None, set()), spec, config.image_size, rng).save(buffer, format="PNG")
            encoded.append(buffer.getvalue())
        result.append(encoded)
    return result


def bench_feature_cache(config: FsgrPmaConfig, repeats: int, batches: int = 4, batch: int = 32) -> dict:
    """Training from pixels (PNG decoding and preprocessing included) ÷ from the feature cache, and that speed-up
    as a share of its bound.

    The cache removes four parts of a step: image decoding and preprocessing, the frozen blocks, and the pseudo-label
    pass; what it keeps is the cached step (rows read from the cache's shards, the adapted blocks, the decoder,
    backward, AdamW). Each part is timed alone in the same run; the bound is (removed + kept) ÷ kept, the speed-up
    if the pixel path cost nothing beyond those parts, and `feature_cache_efficiency` = speed-up ÷ bound.
    """
    import tempfile

    from modeling_fsgr_pma.data.captions import decode_image
    from modeling_fsgr_pma.data.feature_cache import FeatureCache, FeatureCacheWriter
    from modeling_fsgr_pma.processing_fsgr_pma import clip_image_processor

    config = FsgrPmaConfig(**{**config.to_dict(), "lora_first_block": config.vision_layers // 2})
    model = model_with_prototypes(config)
    processor = clip_image_processor(config)
    pngs = synthetic_png_batches(config, batches, batch)

    def preprocess(encoded: list[bytes]) -> torch.Tensor:
        return processor([decode_image(data) for data in encoded], return_tensors="pt")["pixel_values"]

    pixels = [preprocess(encoded) for encoded in pngs]
    with torch.no_grad():
        prefixes = [model.encoder.tower.frozen_prefix(p) for p in pixels]
        labels = [model.encoder.pseudo_labels(prefix) for prefix in prefixes]
    directory = tempfile.TemporaryDirectory(prefix="fsgr_pma_bench_cache_")  # removed when the benchmark returns
    writer = FeatureCacheWriter(directory.name, "train", [str(i) for i in range(batches * batch)], batch, "float16")
    for shard in range(batches):
        writer.write(shard, prefixes[shard], labels[shard])
    cache = FeatureCache(directory.name, "train")
    text = decoder_batch(config, batch, 16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step(image: dict) -> None:
        model(**image, **text).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def from_pixels() -> None:
        for encoded in pngs:
            step({"pixel_values": preprocess(encoded)})

    def from_cache() -> None:
        for i in range(batches):
            hidden, cached_labels = cache.read(range(i * batch, (i + 1) * batch))
            step({"vision_hidden_states": hidden.float(), "patch_labels": cached_labels})

    def decoding() -> None:
        for encoded in pngs:
            preprocess(encoded)

    @torch.no_grad()
    def frozen_blocks() -> None:
        for p in pixels:
            model.encoder.tower.frozen_prefix(p)

    @torch.no_grad()
    def pseudo_labels() -> None:
        for prefix in prefixes:
            model.encoder.pseudo_labels(prefix)

    time_pixels, time_cache = paired_medians(from_pixels, from_cache, repeats)
    removed = sum(median_time(part, repeats) for part in (decoding, frozen_blocks, pseudo_labels))
    directory.cleanup()
    speedup = time_pixels / time_cache
    bound = (removed + time_cache) / time_cache
    return {"feature_cache_speedup": speedup, "feature_cache_bound": bound, "feature_cache_efficiency": speedup / bound}


def rss_probe(memory: str, model_config: Path) -> None:
    """Child-process mode: train a few steps of the preset, print the peak RSS in KiB."""
    config = preset(model_config, use_memory=memory == "on")
    model = model_with_prototypes(config)
    pixel_values = torch.randn(32, 3, config.image_size, config.image_size)
    step = train_step_fn(model, {"pixel_values": pixel_values, **decoder_batch(config, 32, 20)})
    for _ in range(config.memory_window + 5):  # long enough to fill the whole bank
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def bench_peak_rss(repeats: int, model_config: Path) -> float:
    def peak(memory: str) -> int:
        command = [sys.executable, __file__, "--rss-probe", memory, "--model-config", str(model_config)]
        return int(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])

    on = [peak("on") for _ in range(max(1, repeats // 2))]
    off = [peak("off") for _ in range(max(1, repeats // 2))]
    return statistics.median(on) / statistics.median(off)


# ----------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.rss_probe:
        rss_probe(args.rss_probe, args.model_config)
        return {}
    torch.manual_seed(0)
    tiny = preset(args.model_config)
    b16_decoder = preset(
        args.model_config, hidden_size=512, num_hidden_layers=3, num_attention_heads=8, intermediate_size=2048,
        vocab_size=10000, num_prototypes=preset(ROOT / "configuration/model/vit-b16.json").num_prototypes,
        memory_window=4, memory_tokens_per_step=512,
    )
    start = time.perf_counter()
    results = {f"memory_macs_ratio_{name}": memory_macs_ratio(c) for name, c in (("tiny", tiny), ("b16", b16_decoder))}
    results["train_step_memory_ratio_tiny"] = bench_train_step(tiny, 32, 20, args.repeats)
    if not args.quick:
        results["train_step_memory_ratio_b16"] = bench_train_step(b16_decoder, 32, 20, args.repeats)
    results["train_step_memory_ratio"] = max(v for k, v in results.items() if k.startswith("train_step"))
    results.update(bench_refresh(tiny, args.repeats))
    results.update(bench_generate_memory(tiny, args.repeats))
    if not args.quick:  # like the training step: per decoder, and the worse of the two
        b16_generate = bench_generate_memory(b16_decoder, args.repeats)
        for key, value in b16_generate.items():
            results[f"{key}_tiny"], results[f"{key}_b16"] = results[key], value
            results[key] = max(results[key], value)
    results.update(bench_vs_ved(tiny, args.repeats))
    if not args.quick:
        results.update(bench_flops_utilisation(b16_decoder, args.repeats))
    results.update(bench_feature_cache(tiny, args.repeats))
    if not args.quick:
        b16 = preset(ROOT / "configuration/model/vit-b16.json")
        b16_cache = bench_feature_cache(b16, args.repeats, batches=2, batch=4)
        results.update({f"{key}_b16": value for key, value in b16_cache.items()})
    results["peak_rss_memory_ratio"] = bench_peak_rss(args.repeats, args.model_config)
    results = {k: round(float(v), 4) for k, v in results.items()}
    results["seconds"] = round(time.perf_counter() - start, 1)
    write_report(args.output, results, args.quick)
    return results


GOALS = {
    "refresh_share": "≤ 0.03",
    "generate_memory_ratio_greedy": "≤ 1.05",
    "generate_memory_ratio_beam5": "≤ 1.05",
    "train_step_memory_ratio_tiny": "≤ 1.10",
    "train_step_memory_ratio_b16": "≤ `memory_macs_ratio_b16` + 0.03",
    "generate_memory_ratio_greedy_b16": "≤ `memory_macs_ratio_b16` + 0.03",
    "generate_memory_ratio_beam5_b16": "≤ `memory_macs_ratio_b16` + 0.03",
    "generate_vs_ved_ratio_b1": "≥ 1.25",
    "generate_vs_ved_ratio_b32": "≥ 1.25",
    "feature_cache_efficiency": "≥ 0.90",
    "feature_cache_efficiency_b16": "≥ 0.90",
    "peak_rss_memory_ratio": "≤ 1.05",
    "train_step_flops_utilisation_b16": "≥ 0.40 and above `..._ved`",
}


def write_report(path: Path, results: dict, quick: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, Python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"
    )
    lines = [f"Benchmark ({'quick' if quick else 'full'}) on {machine}", "", "| figure | value | goal |", "|---|---|---|"]
    lines += [f"| `{key}` | {value} | {GOALS.get(key, '')} |" for key, value in results.items()]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

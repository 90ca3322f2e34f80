"""Side-by-side speed and memory benchmarks; every figure is a ratio measured in one run on one machine.

Usage:

    python tools/benchmark.py --preset vit-b16 --output outputs/benchmark_b16.json   # the goals, about 5 min
    python tools/benchmark.py --output outputs/benchmark.json                         # tiny guards, about 4 min

Each timing is the median of `--repeats` runs after a warm-up, and the two sides of a ratio alternate (A B A B)
so that drift in the machine's speed cancels. Writes JSON (the figures, and each goal with whether it holds) and a
markdown table next to it (`.md`) with the machine and library versions. Models have random weights (prototypes
set to random unit-scale values, so memory attention is active), and captioning runs on the model as released:
`train.py` (`save_release`) and `push_to_hub.py` merge the tower's LoRA into its weights before saving.

`--preset vit-b16` measures only the goal rows, at the size users run: `configuration/model/vit-b16.json` (ViT-B/16
tower at 224 px, LoRA from block 6, decoder of 3 layers of width 512, 256 prototypes, vocabulary 10,000):

- `memory_macs_ratio_b16`: not a timing: the decoder's multiply-adds per caption token with memory ÷ without,
  counted from the config: what the memory costs if every multiply-add takes the same time.
- `train_step_memory_ratio_b16`: a decoder training step (forward + backward + AdamW; a random encoder output of the
  right shape is given, batch 50 captions of 20 tokens, FSGR's batch) with prototype memory on ÷ off, the same
  weights. Goal: ≤ `memory_macs_ratio_b16` + 0.03. This row, the two below and the batch-1 captioning ratio are
  each the median of 3 repeats of their paired measurement, since their goals sit within a few per cent of them.
- `generate_memory_ratio_greedy_b16`, `generate_memory_ratio_beam5_b16`: `generate` from the encoder's output
  (batch 8, 20 new tokens, greedy and 5 beams) with memory on ÷ off: the decoder's share of captioning, which the
  memory changes (the encoder, the same on both sides, is left out). Goal: ≤ `memory_macs_ratio_b16` + 0.03.
- `generate_vs_ved_ratio_b16_b1`, `generate_vs_ved_ratio_b16_b32`: whole captioning calls from pixels (encoder +
  `generate`, 5 beams, 20 new tokens, as the recipe decodes), our captions per second ÷ those of transformers'
  `VisionEncoderDecoderModel` of the same size (ViT + GPT-2 of the same width, depth, heads, vocabulary and image
  size, both with a KV cache), batch 1 and 32; at batch 32 (calls of 15-20 s each) the mean of at most 2 pairs,
  without a separate warm-up (the batch-1 runs warmed both models). Goal: ≥ 1.10.
- `train_step_flops_utilisation_b16`: the decoder training step above (memory on) in FLOPs per second, counted from
  the shapes (`decoder_step_flops`), ÷ the machine's dense float32 matmul rate (`matmul_gflops`, a 2048² `torch.mm`);
  `..._ved`: the same for the peer's GPT-2 decoder (no goal). Goal: ≥ 0.70.
- `feature_cache_efficiency_b16`: training from PNG-encoded images (decoded and preprocessed in the step) ÷ from
  the feature cache's shards (`feature_cache_speedup_b16`), as a share of its bound (`feature_cache_bound_b16`: the
  speed-up if the pixel path cost only the parts the cache removes, each timed alone, plus the cached step), batch
  4, LoRA from block 6. Goal: ≥ 0.90.

The default `--preset tiny` (`configuration/model/tiny.json`, seconds per figure) guards against regressions and
explains where time goes:

- `train_step_memory_ratio_tiny` (batch 32, 10 steps per timed sample), `generate_memory_ratio_greedy_tiny`,
  `generate_memory_ratio_beam5_tiny` (as at b16): each the median of 3 repeats of the paired measurement, since
  tiny steps of a few milliseconds move by more than 10% between runs. Goal: ≤ 1.15. `memory_macs_ratio_tiny`.
- `refresh_share`: refresh time ÷ (refresh time + `memory_refresh_every` training steps); `kmeans_faiss_s` and
  `kmeans_torch_s`: one K-Means of the full bank. Goal: `refresh_share` ≤ 0.03.
- `generate_vs_ved_ratio_tiny_b1`, `_b32` (`..._unmerged`: the tower's LoRA left unmerged, as during training);
  `encoder_vs_vit_time_ratio_b1|b32`: our encoder's time ÷ the peer's ViT; `encoder_share_{tower,dense,quantize,
  interaction}_b32`: each encoder stage's share of its time (timed alone); `tower_vs_vit_time_ratio_b32`.
- `feature_cache_speedup`, `feature_cache_bound`, `feature_cache_efficiency`: as at b16, batch 32.
- `peak_rss_memory_ratio`: peak resident memory of a training process with memory on ÷ off. Goal: ≤ 1.05.
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
from modeling_fsgr_pma.modeling_fsgr_pma import FsgrPmaEncoderOutput

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("tiny", "vit-b16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="tiny",
                        help="tiny: regression guards and diagnostics; vit-b16: the goal rows at the size users run")
    parser.add_argument("--output", type=Path, default=None, help="JSON (default outputs/benchmark[_b16].json)")
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs per figure (vit-b16, batch 32: at most 2)")
    parser.add_argument("--model-config", type=Path, default=None,
                        help="the config measured (default configuration/model/PRESET.json; the tests pass a smaller one)")
    parser.add_argument("--rss-probe", choices=["on", "off"], help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args(argv)
    args.model_config = args.model_config or ROOT / f"configuration/model/{args.preset}.json"
    suffix = "" if args.preset == "tiny" else "_b16"
    args.output = args.output or Path(f"outputs/benchmark{suffix}.json")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Timing
def paired_medians(run_a, run_b, repeats: int, warm_up: bool = True) -> tuple[float, float]:
    """Median seconds of two callables, timed alternately (A B A B), after one warm-up each unless `warm_up=False`."""
    if warm_up:
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


def median_of_ratios(measure, runs: int = 3) -> float:
    """The median of `runs` repeats of a paired measurement returning (time A, time B): the median of A ÷ B."""
    return statistics.median(a / b for a, b in (measure() for _ in range(runs)))


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


def encoder_output(config: FsgrPmaConfig, batch: int) -> FsgrPmaEncoderOutput:
    """A random encoder output of the shape the decoder reads, `(B, n, d)`: the decoder's cost does not depend on its
    values, and the encoder's is left out (for vit-b16, a batch of 50 images would take a minute to encode)."""
    generator = torch.Generator().manual_seed(1)
    return FsgrPmaEncoderOutput(
        last_hidden_state=torch.randn(batch, config.num_patches, config.hidden_size, generator=generator)
    )


def train_step_fn(model: FsgrPmaForConditionalGeneration, inputs: dict, steps: int = 1):
    """A callable running `steps` training steps: timing several per sample steadies a step of a few ms."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)  # train.py's
    model.train()

    def run():
        for _ in range(steps):
            loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def encoder_given_inputs(config: FsgrPmaConfig, batch: int, length: int) -> dict:
    """Decoder-side training inputs with a given encoder output (the encoder's cost is left out)."""
    return {"encoder_outputs": encoder_output(config, batch), **decoder_batch(config, batch, length)}


# ----------------------------------------------------------------------------------------------------------------
# Benchmarks
def bench_train_step(models: tuple, config: FsgrPmaConfig, batch: int, length: int, repeats: int, steps: int):
    """Seconds of `steps` decoder training steps with memory on and off (`memory_on_and_off`; paired medians)."""
    on, off = models
    inputs = encoder_given_inputs(config, batch, length)
    return paired_medians(train_step_fn(on, inputs, steps), train_step_fn(off, inputs, steps), repeats)


def memory_macs_ratio(config: FsgrPmaConfig, length: int = 20) -> float:
    """Decoder multiply-adds per caption token with prototype memory ÷ without: the memory's share of the arithmetic.

    Per layer and token: self-attention projections 4d², scores and reads over the ~length/2 earlier tokens, the
    cross-attention's query and output projections 2d², its scores and reads over the N encoder tokens, the
    encoder tokens' keys and values 2Nd² shared by the caption's `length` tokens, the MLP 2d·d_ff; once per
    token the LM head d·V. The memory adds scores and reads over m prototypes, 2md per layer.
    """
    d, m, encoder_tokens = config.hidden_size, config.num_prototypes, config.num_patches
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
    scores and reads over the N encoder tokens 2Nd, the MLP 2d·d_ff; per token the LM head dV. Per image and layer
    the encoder tokens' keys and values 2Nd², and with `encoder_width` a projection of the encoder tokens to d first
    (VisionEncoderDecoder's `enc_to_dec_proj`). Every position is counted over the whole sequence, as the fused
    attention computes it. FLOPs = 2 × multiply-adds; backward ≈ 2 × forward (input and weight gradients), except
    for the per-image projections of the given encoder output, which need only their weight gradient (1 ×).
    """
    d, tokens = config.hidden_size, config.num_patches + 1 if encoder_width else config.num_patches
    keys = length + (config.num_prototypes if memory else 0)
    per_token = 4 * d * d + 2 * keys * d + 2 * d * d + 2 * tokens * d + 2 * d * config.intermediate_size
    per_image = config.num_hidden_layers * 2 * tokens * d * d + tokens * encoder_width * d
    token_macs = batch * length * (config.num_hidden_layers * per_token + d * config.vocab_size)
    return 2 * (3 * token_macs + 2 * batch * per_image)


def matmul_flops_per_second(repeats: int, size: int = 2048) -> float:
    """The machine's dense float32 matmul rate: a square `torch.mm` of `size`, FLOPs ÷ median seconds."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / median_time(lambda: torch.mm(a, b), repeats)


def bench_flops_utilisation(config: FsgrPmaConfig, repeats: int, batch: int, length: int = 20, steps: int = 1) -> dict:
    """Our decoder's and VisionEncoderDecoder's GPT-2 decoder's training step: analytic FLOPs ÷ time ÷ matmul rate."""
    from transformers.modeling_outputs import BaseModelOutput

    ours = model_with_prototypes(config)
    step_ours = train_step_fn(ours, encoder_given_inputs(config, batch, length), steps)
    peer = ved_baseline(config).train()
    peer_inputs = decoder_batch(config, batch, length)
    encoded = BaseModelOutput(last_hidden_state=torch.randn(batch, config.num_patches + 1, config.vision_width))
    optimizer = torch.optim.AdamW([p for p in peer.parameters() if p.requires_grad], lr=1e-4, fused=True)

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
    step_time = median_time(train_step_fn(model, encoder_given_inputs(config, 32, 20)), repeats)
    refresh_time = result["kmeans_faiss_s"] * len(layers)
    result["refresh_share"] = refresh_time / (refresh_time + config.memory_refresh_every * step_time)
    return result


def captioning_from_encoder_output(config: FsgrPmaConfig, batch: int, beams: int):
    """A callable running `generate` on a model from a given encoder output (`batch` images, `beams` beams, 20 new
    tokens): the decoder's share of captioning."""
    encoded = encoder_output(config, batch).last_hidden_state
    kwargs = {"num_beams": beams, "max_new_tokens": 20, "min_new_tokens": 20, "pad_token_id": config.pad_token_id}

    def run(model):
        with torch.inference_mode():
            model.generate(encoder_outputs=FsgrPmaEncoderOutput(last_hidden_state=encoded), **kwargs)

    return run


def generate_memory_times(models: tuple, config: FsgrPmaConfig, repeats: int, beams: int, batch: int = 8):
    """Seconds of `captioning_from_encoder_output` with memory on and off (`memory_on_and_off`, released), paired
    medians."""
    on, off = models
    run = captioning_from_encoder_output(config, batch, beams)
    return paired_medians(partial(run, on), partial(run, off), repeats)


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


def captioning_vs_ved(ours, theirs, config: FsgrPmaConfig, batch: int, repeats: int, warm_up: bool = True):
    """Seconds of a whole captioning call from pixels (5 beams, 20 new tokens), ours and the peer's (paired)."""
    pixel_values = torch.randn(batch, 3, config.image_size, config.image_size)
    kwargs = {"num_beams": 5, "max_new_tokens": 20, "min_new_tokens": 20, "use_cache": True,
              "pad_token_id": config.pad_token_id}

    def run(model):
        with torch.inference_mode():
            model.generate(pixel_values=pixel_values, **kwargs)

    return paired_medians(partial(run, ours), partial(run, theirs), repeats, warm_up)


def bench_vs_ved(config: FsgrPmaConfig, repeats: int) -> dict:
    """The tiny preset's comparison with the peer, and where our encoder's time goes."""
    unmerged = model_with_prototypes(config).eval()
    ours = released(model_with_prototypes(config))
    theirs = ved_baseline(config)
    result = {}
    for batch in (1, 32):
        for name, model in (("", ours), ("_unmerged", unmerged)):
            time_ours, time_theirs = captioning_vs_ved(model, theirs, config, batch, repeats)
            result[f"generate_vs_ved_ratio_tiny_b{batch}{name}"] = time_theirs / time_ours  # captions/s ours ÷ theirs

        pixel_values = torch.randn(batch, 3, config.image_size, config.image_size)

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
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
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
def bench_tiny(config: FsgrPmaConfig, args: argparse.Namespace) -> dict:
    """The tiny preset's regression guards and diagnostics (see the module docstring)."""
    repeats = args.repeats
    results = {"memory_macs_ratio_tiny": memory_macs_ratio(config)}
    models = memory_on_and_off(config)
    results["train_step_memory_ratio_tiny"] = median_of_ratios(partial(bench_train_step, models, config, 32, 20,
                                                                       repeats, 10))
    models = tuple(released(model) for model in models)
    for name, beams in (("greedy", 1), ("beam5", 5)):
        measure = partial(generate_memory_times, models, config, repeats, beams)
        results[f"generate_memory_ratio_{name}_tiny"] = median_of_ratios(measure)
    results.update(bench_refresh(config, repeats))
    results.update(bench_vs_ved(config, repeats))
    results.update(bench_feature_cache(config, repeats))
    results["peak_rss_memory_ratio"] = bench_peak_rss(repeats, args.model_config)
    return results


def bench_b16(config: FsgrPmaConfig, args: argparse.Namespace) -> dict:
    """The goal rows at the vit-b16 preset's size (see the module docstring)."""
    repeats = args.repeats
    results = {"memory_macs_ratio_b16": memory_macs_ratio(config)}
    # The rows whose goals sit within a few per cent of their measurement: the median of 3 paired measurements.
    models = memory_on_and_off(config)
    results["train_step_memory_ratio_b16"] = median_of_ratios(partial(bench_train_step, models, config, 50, 20,
                                                                      repeats, 1))
    models = tuple(released(model) for model in models)
    for name, beams in (("greedy", 1), ("beam5", 5)):
        measure = partial(generate_memory_times, models, config, repeats, beams)
        results[f"generate_memory_ratio_{name}_b16"] = median_of_ratios(measure)
    ours, theirs = released(model_with_prototypes(config)), ved_baseline(config)
    # captions/s ours ÷ theirs; batch 1 warms both models up for batch 32, whose calls take 15-20 s each: 2 pairs
    batch_1 = partial(captioning_vs_ved, ours, theirs, config, 1, repeats)
    results["generate_vs_ved_ratio_b16_b1"] = median_of_ratios(lambda: batch_1()[::-1])
    time_ours, time_theirs = captioning_vs_ved(ours, theirs, config, 32, min(repeats, 2), warm_up=False)
    results["generate_vs_ved_ratio_b16_b32"] = time_theirs / time_ours
    del ours, theirs
    results.update(bench_flops_utilisation(config, repeats, batch=50))
    cache = bench_feature_cache(config, repeats, batches=1, batch=4)
    results.update({f"{key}_b16": value for key, value in cache.items()})
    return results


def main(argv: list[str] | None = None) -> dict:
    """Run the preset's rows; returns the figures (also written, with the goals, to `--output` and its `.md`)."""
    args = parse_args(argv)
    if args.rss_probe:
        rss_probe(args.rss_probe, args.model_config)
        return {}
    torch.manual_seed(0)
    start = time.perf_counter()
    config = preset(args.model_config)
    results = (bench_tiny if args.preset == "tiny" else bench_b16)(config, args)
    results = {key: round(float(value), 4) for key, value in results.items()}
    write_report(args, results, round(time.perf_counter() - start, 1))
    return results


# figure → (comparison, bound, reference): holds when `figure comparison bound [+ results[reference]]`.
GOALS = {
    "train_step_memory_ratio_tiny": ("≤", 1.15, None),
    "generate_memory_ratio_greedy_tiny": ("≤", 1.15, None),
    "generate_memory_ratio_beam5_tiny": ("≤", 1.15, None),
    "refresh_share": ("≤", 0.03, None),
    "peak_rss_memory_ratio": ("≤", 1.05, None),
    "train_step_memory_ratio_b16": ("≤", 0.03, "memory_macs_ratio_b16"),
    "generate_memory_ratio_greedy_b16": ("≤", 0.03, "memory_macs_ratio_b16"),
    "generate_memory_ratio_beam5_b16": ("≤", 0.03, "memory_macs_ratio_b16"),
    "generate_vs_ved_ratio_b16_b1": ("≥", 1.10, None),
    "generate_vs_ved_ratio_b16_b32": ("≥", 1.10, None),
    "train_step_flops_utilisation_b16": ("≥", 0.70, None),
    "feature_cache_efficiency_b16": ("≥", 0.90, None),
}


def check_goals(results: dict) -> dict:
    """Each measured figure's goal: its text, the bound it is held to and whether it holds."""
    checked = {}
    for key, (comparison, bound, reference) in GOALS.items():
        if key not in results:
            continue
        text = f"{comparison} {bound}" if reference is None else f"{comparison} `{reference}` + {bound}"
        bound = bound if reference is None else round(results[reference] + bound, 4)
        holds = results[key] <= bound if comparison == "≤" else results[key] >= bound
        checked[key] = {"goal": text, "bound": bound, "holds": holds}
    return checked


def write_report(args: argparse.Namespace, results: dict, seconds: float) -> None:
    """JSON (machine, command, figures, goals) at `args.output`, and the same as a markdown table beside it."""
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, Python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"
    )
    goals = check_goals(results)
    model_config = args.model_config.resolve()
    model_config = model_config.relative_to(ROOT) if model_config.is_relative_to(ROOT) else model_config
    report = {
        "preset": args.preset, "model_config": str(model_config), "repeats": args.repeats, "machine": machine,
        "seconds": seconds, "figures": results, "goals": goals,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"Benchmark `--preset {args.preset}` ({args.model_config.name}, {args.repeats} repeats, {seconds:.0f} s) on "
        f"{machine}", "", "| figure | value | goal | holds |", "|---|---|---|---|",
    ]
    for key, value in results.items():
        goal = goals.get(key)
        verdict = "" if goal is None else ("pass" if goal["holds"] else "**fail**")
        bound = "" if goal is None else f"{goal['goal']}" + (f" = {goal['bound']}" if "`" in goal["goal"] else "")
        lines.append(f"| `{key}` | {value} | {bound} | {verdict} |")
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Fine-tune a trained FSGR-PMA model on a new domain with PEFT LoRA, under Accelerate; only the adapter is saved.

Usage (the README's domain-transfer demo, after `python scripts/demo.py`):

    python scripts/make_synthetic.py --output-dir outputs/demo/data-b --domain scenes-b --num-images 1000 --seed 1
    accelerate launch scripts/finetune_peft.py --base-model outputs/demo/model --data outputs/demo/data-b \
        --output-dir outputs/demo/peft

`get_peft_model` wraps the loaded remote-code model with the `LoraConfig` of `--lora-config` (default
`configuration/lora/default.json`: the tiny preset's upper vision blocks, `attn`/`c_fc`/`c_proj`, and every decoder
attention projection; `configuration/lora/vit-b16.json` for the ViT-B/16 preset), plus, unless the config sets
`trainable_token_indices`, the embedding rows of the tokens that spell words the base tokenizer lacks (the new
domain's vocabulary; the LM head is tied to them). Everything else stays frozen.
The loss is the model's own (XE + β·SupCon); training references longer than the decoder's positions are dropped
(each image keeps at least one). `--memory frozen` keeps the base model's prototypes; `--memory
refresh` refills the banks with the new domain and re-clusters them every `memory_refresh_every` steps once a full
window has been seen, and saves the new prototypes next to the adapter.

Writes to OUTPUT_DIR: `adapter_model.safetensors`, `adapter_config.json` (PEFT), `fsgr_pma_base.json` (the base
model's identity, checked on load), `prototypes.safetensors` (only with `--memory refresh`), `merged/` (the adapter
merged into a plain model with `merge_and_unload`, with processor: loads with `AutoModel` alone), and
`finetune_summary.json` (trainable parameters, CIDEr-D on the evaluation split before and after). Load the adapter
with `modeling_fsgr_pma.training.adapters.load_adapter(AutoModel.from_pretrained(BASE, trust_remote_code=True), OUTPUT_DIR)`,
`fsgr-pma caption --model BASE --adapter OUTPUT_DIR`, or `scripts/evaluate_captions.py --model BASE --adapter OUTPUT_DIR`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from modeling_fsgr_pma.training.adapters import apply_lora, base_fingerprint, new_word_token_ids, read_lora_config, save_adapter
from modeling_fsgr_pma.data.captions import load_caption_split
from modeling_fsgr_pma.cli.loading import load_pretrained
from modeling_fsgr_pma.evaluation.metrics import TokenizedCiderD
from modeling_fsgr_pma.training.steps import CaptionCollator, bank_report, generate_captions, refresh_memory

logger = get_logger(__name__)
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", required=True, help="trained model directory or Hub repo id")
    parser.add_argument("--revision", default=None, help="Hub revision of the base model")
    parser.add_argument("--data", required=True, help="dataset directory of the new domain")
    parser.add_argument("--image-root", default=None)
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--eval-split", default="validation")
    parser.add_argument("--eval-max-images", type=int, default=200, help="caption only the first N eval images")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--lora-config", type=Path, default=ROOT / "configuration/lora/default.json")
    parser.add_argument("--memory", choices=["frozen", "refresh"], default="frozen",
                        help="keep the base prototypes, or re-cluster them on the new domain")
    parser.add_argument("--steps", type=int, default=500, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--eval-batch-size", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--kmeans-backend", choices=["auto", "faiss", "torch"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    return args


def keep_fitting_captions(data, tokenizer, max_length: int):
    """Drop training references longer than the decoder's positions (the base tokenizer spells new words in pieces).

    A truncated reference teaches captions that never end; every image keeps at least its shortest reference.
    Only the captions column is replaced: the images are not copied.
    """
    kept_per_image, before = [], 0
    for captions in data["captions"]:
        before += len(captions)
        lengths = [len(ids) for ids in tokenizer(list(captions))["input_ids"]]
        kept = [caption for caption, length in zip(captions, lengths) if length <= max_length]
        kept_per_image.append(kept or [captions[lengths.index(min(lengths))]])
    after = sum(len(kept) for kept in kept_per_image)
    logger.info(f"{after} of {before} training references fit in {max_length} tokens")
    feature = data.features["captions"]
    return data.remove_columns("captions").add_column("captions", kept_per_image, feature=feature)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = Accelerator(
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],  # the SupCon head is frozen
    )
    set_seed(args.seed)
    lora_config = read_lora_config(args.lora_config)  # fail on a bad config before loading anything

    # Base model, processor, adapter
    base, processor = load_pretrained(args.base_model, args.revision)
    if base.config.lora_rank > 0 and not base.config.lora_merged:
        raise ValueError(
            f"{args.base_model} still has its training LoRA unmerged; fine-tune a release (train.py's "
            "OUTPUT_DIR/model, or a model after model.merge_encoder_lora() and save_pretrained)"
        )
    fingerprint = base_fingerprint(base)

    # Data
    train_data = load_caption_split(args.data, args.train_split, args.image_root)
    eval_data = load_caption_split(args.data, args.eval_split, args.image_root)
    eval_data = eval_data.select(range(min(args.eval_max_images, len(eval_data))))
    max_length = base.config.max_position_embeddings
    train_data = keep_fitting_captions(train_data, processor.tokenizer, max_length)

    # Adapter: LoRA, plus the embedding rows that spell the new domain's words (unless the config names tokens)
    if lora_config.trainable_token_indices is None:
        captions = [caption for captions in train_data["captions"] for caption in captions]
        new_tokens = new_word_token_ids(captions, processor.tokenizer)
        if new_tokens:
            lora_config.trainable_token_indices = {"embed_tokens": new_tokens}
            logger.info(f"{len(new_tokens)} tokens spell words the base vocabulary lacks; their embeddings train")
    model = apply_lora(base, lora_config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    train_data = train_data.add_column("row", list(range(len(train_data))))
    eval_data = eval_data.add_column("row", list(range(len(eval_data))))
    collator = CaptionCollator(processor, max_length, seed=args.seed)
    train_loader = DataLoader(
        train_data, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collator,
        generator=torch.Generator().manual_seed(args.seed),
    )
    eval_loader = DataLoader(
        eval_data, batch_size=args.eval_batch_size, collate_fn=CaptionCollator(processor, max_length, with_captions=False)
    )
    if len(train_loader) == 0:
        raise ValueError(f"The training split has {len(train_data)} images: fewer than one batch of {args.batch_size}")

    # Optimisation: the adapter's parameters only, fused AdamW as train.py's
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=args.weight_decay,
        fused=True,
    )
    scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=args.warmup_steps * accelerator.num_processes,
        num_training_steps=args.steps * accelerator.num_processes,
    )
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    peft_model = accelerator.unwrap_model(model)
    inner = peft_model.get_base_model()  # the FSGR-PMA model, with LoRA layers inside
    eval_ids = list(eval_data["image_id"])
    eval_cider = TokenizedCiderD(dict(zip(eval_ids, list(eval_data["captions"]))))

    def evaluate() -> float:
        captions = generate_captions(
            accelerator, inner, eval_loader, processor.tokenizer, eval_ids,
            num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
        )
        return float(eval_cider.score(list(captions.values()), list(captions)).mean())

    cider_before = evaluate()
    logger.info(f"base model: CIDEr-D {cider_before:.3f} on {len(eval_ids)} {args.eval_split} images")

    # Training loop
    config = inner.config
    refresh = args.memory == "refresh" and config.use_memory
    progress = tqdm(total=args.steps, desc="fine-tuning", disable=not accelerator.is_local_main_process)
    step, epoch = 0, 0
    model.train()
    while step < args.steps:
        train_loader.set_epoch(epoch)
        collator.epoch = epoch
        for batch in train_loader:
            inputs = {k: v for k, v in batch.items() if k != "row"}
            loss = model(**inputs, labels=batch["input_ids"]).loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
            # No refresh at the last step: the adapter would never train against those prototypes.
            if refresh and config.memory_window <= step < args.steps and step % config.memory_refresh_every == 0:
                refresh_memory(accelerator, inner, seed=args.seed + step, backend=args.kmeans_backend)
                logger.info(f"step {step}: prototypes refreshed on the new domain ({bank_report(inner)})")
            if step >= args.steps:
                break
        epoch += 1
    progress.close()

    cider_after = evaluate()
    logger.info(f"fine-tuned: CIDEr-D {cider_after:.3f} (base {cider_before:.3f})")
    summary = {
        "base_model": str(args.base_model),
        "memory": args.memory,
        "steps": step,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_share": trainable / total,
        "eval_split": args.eval_split,
        "eval_images": len(eval_ids),
        "cider_before": cider_before,
        "cider_after": cider_after,
    }
    if accelerator.is_main_process:
        save_adapter(peft_model, args.output_dir, str(args.base_model), fingerprint, args.memory)
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(args.output_dir / "merged")
        processor.save_pretrained(args.output_dir / "merged")
        (args.output_dir / "finetune_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info(f"Saved the adapter to {args.output_dir} and the merged model to {args.output_dir / 'merged'}")
    return summary


if __name__ == "__main__":
    main()

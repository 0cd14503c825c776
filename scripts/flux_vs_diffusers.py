"""visionlora's style recipe on Flux beside diffusers' own Flux LoRA example, same pipeline and data.

    python scripts/flux_vs_diffusers.py --example DIFFUSERS/examples/dreambooth/train_dreambooth_lora_flux.py

Both train LoRA (rank ``--rank``, alpha = rank) on the example's default modules (the double-stream
blocks' attention and feed-forward Linears, and the single-stream blocks' q/k/v) of the same small
Flux pipeline, built here from configs (nothing is downloaded; a made-up T5 and CLIP vocabulary),
on the same photos (scikit-image's bundled images) under one instance prompt, with the same batch,
learning rate, uniform σ without shift, guidance embedding 3.5, T5 length, steps and fp32. Each
tool runs as its own process twice, for ``--steps A B`` steps:

- seconds per step after warm-up = (time(B) - time(A)) / (B - A), which leaves out start-up, the
  one-off caching and the writing of results;
- end to end = the whole run of B steps, start-up and outputs included;
- peak memory = the process's peak resident set size (CPU) of the B-step run.

diffusers' example is run twice: as it comes (every batch through the VAE at every step; the one
prompt is encoded once either way), and with its ``--cache_latents``. Its path is an argument: its
code is run, not copied. It needs ``pip install datasets`` (imported by the example) and scikit-image.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sdxl_vs_diffusers import report, timed, write_images  # a sibling script's helpers

PROMPT = "a photo in zz style"


def _tokenizers(folder: Path) -> tuple[object, object]:
    """A CLIP tokenizer and a T5 tokenizer (unigram, as T5's own) over a made-up letter vocabulary."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    clip = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in letters] + [("▁" + c, -2.5) for c in letters]
    unigram = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    unigram.pre_tokenizer, unigram.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    t5 = transformers.T5TokenizerFast(
        tokenizer_object=unigram, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0
    )
    t5.model_max_length = 512
    return clip, t5


def build_pipeline(folder: Path, width: int) -> None:
    """A small FLUX.1-dev-like pipeline: 2 double- and 4 single-stream blocks ``width`` wide, guidance
    embedding, FLUX.1-dev's scheduler, a 2-layer CLIP (pooled) and T5, and a 2-level VAE."""
    import diffusers
    import transformers

    clip_tokens, t5_tokens = _tokenizers(folder.parent / "vocab")
    torch.manual_seed(0)
    heads = width // 32
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=heads,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        guidance_embeds=True,
        axes_dims_rope=[8, 12, 12],
    )
    clip = transformers.CLIPTextConfig(
        vocab_size=len(clip_tokens),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    t5 = transformers.T5Config(vocab_size=len(t5_tokens), d_model=64, d_kv=16, d_ff=256, num_layers=2, num_heads=4)
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
        shift_factor=0.1159,
        scaling_factor=0.3611,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
    )
    pipe = diffusers.FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=transformers.CLIPTextModel(clip),
        tokenizer=clip_tokens,
        text_encoder_2=transformers.T5EncoderModel(t5),
        tokenizer_2=t5_tokens,
        transformer=transformer,
    )
    pipe.save_pretrained(str(folder))


TARGETS = ["preset:flux-double", "re:single_transformer_blocks\\.\\d+\\.attn\\.to_[qkv]"]
"""The example's default target_modules, which PEFT matches by suffix (attn.to_q also in single blocks)."""


def recipe(pipeline: Path, images: Path, args: argparse.Namespace, steps: int) -> dict:
    return {
        "task": "diffusion-style",
        "model": {"pipeline": str(pipeline)},
        "data": {
            "root": str(images),
            "resolution": args.resolution,
            "batch_size": args.batch,
            "center_crop": True,
            "random_flip": False,
            "cache": True,
            "max_sequence_length": args.max_sequence_length,
        },
        "dreambooth": {"instance_prompt": PROMPT},
        "lora": {"targets": TARGETS, "rank": args.rank, "alpha": args.rank},
        "train": {
            "epochs": 1000,
            "max_steps": steps,
            "lr": args.lr,
            "warmup_steps": 0,
            "weight_decay": 1e-4,  # the example's AdamW default
            "min_snr_gamma": None,
            "timestep_sampling": "uniform",  # the example's --weighting_scheme none
            "flow_shift": 1.0,  # the example draws from its scheduler's unshifted sigmas
            "flux_guidance": 3.5,
            "mixed_precision": "no",
            "seed": 0,
        },
        "validation": {"prompts": []},
        "output": {"export": ["diffusers"], "merged_dtype": "fp32"},
    }


def example_argv(args: argparse.Namespace, pipeline: Path, images: Path, steps: int, out: Path, cache: bool) -> list:
    return [
        sys.executable,
        str(args.example),
        f"--pretrained_model_name_or_path={pipeline}",
        f"--instance_data_dir={images}",
        f"--instance_prompt={PROMPT}",
        f"--resolution={args.resolution}",
        "--center_crop",
        f"--train_batch_size={args.batch}",
        f"--max_train_steps={steps}",
        f"--learning_rate={args.lr}",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        f"--rank={args.rank}",
        f"--max_sequence_length={args.max_sequence_length}",
        "--guidance_scale=3.5",
        "--weighting_scheme=none",
        "--mixed_precision=no",
        "--seed=0",
        "--dataloader_num_workers=0",
        *(["--cache_latents"] if cache else []),
        f"--output_dir={out}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--example", required=True, type=Path, help="diffusers' train_dreambooth_lora_flux.py")
    parser.add_argument("--work", type=Path, default=Path("runs/flux-vs-diffusers"))
    parser.add_argument("--steps", type=int, nargs=2, default=[4, 24])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--width", type=int, default=128, help="the transformer's width (a multiple of 32)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-sequence-length", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = args.work.resolve()
    pipeline, captioned, images = work / "pipe", work / "captioned", work / "images"
    if not (pipeline / "model_index.json").is_file():
        build_pipeline(pipeline, args.width)
    write_images(captioned, args.images, args.resolution)
    images.mkdir(parents=True, exist_ok=True)  # the example opens every file of its folder as an image
    for png in captioned.glob("*.png"):
        shutil.copy(png, images / png.name)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    env["HF_HUB_OFFLINE"] = env["HF_DATASETS_OFFLINE"] = "1"
    tools = ["visionlora", "diffusers example", "diffusers example --cache_latents"]
    results: dict[str, dict[int, tuple[float, float]]] = {tool: {} for tool in tools}
    for steps in args.steps:
        path = work / f"recipe-{steps}.yaml"
        path.write_text(json.dumps(recipe(pipeline, images, args, steps)))  # JSON is YAML
        out = work / f"visionlora-{steps}"
        results[tools[0]][steps] = timed(
            [sys.executable, "-m", "visionlora", "train", str(path), "--output", str(out), "--overwrite"], env
        )
        for tool, cache in ((tools[1], False), (tools[2], True)):
            out = work / f"example-{'cached-' if cache else ''}{steps}"
            results[tool][steps] = timed(example_argv(args, pipeline, images, steps, out, cache), env)
    report(results, args, f"rank {args.rank}, width {args.width}, {args.images} images")


if __name__ == "__main__":
    main()

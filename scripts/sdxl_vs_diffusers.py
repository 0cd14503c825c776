"""visionlora's SDXL style recipe beside diffusers' own SDXL LoRA example, on the same pipeline and data.

    python scripts/sdxl_vs_diffusers.py --example DIFFUSERS/examples/text_to_image/train_text_to_image_lora_sdxl.py

Both train LoRA (rank ``--rank``, alpha = rank) on the UNet's attention (to_q/k/v/out.0) of the same
small SDXL pipeline, built here from a config (nothing is downloaded), on the same captioned photos
(scikit-image's bundled images, centre-cropped squares), with the same batch, learning rate,
min-SNR gamma, steps and fp32. Each tool runs as its own process twice, for ``--steps A B`` steps:

- seconds per step after warm-up = (time(B) - time(A)) / (B - A), which leaves out start-up, the
  one-off caching and the writing of results;
- end to end = the whole run of B steps, start-up and outputs included;
- peak memory = the process's peak resident set size (CPU) of the B-step run.

diffusers' example encodes every batch through the VAE and both text encoders at every step;
visionlora encodes each image and caption once. The example's path is an argument: its code is
run, not copied. It needs ``pip install datasets`` (the example's image-folder loader) and scikit-image.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

CAPTION = "a photo in zz style"


def build_pipeline(folder: Path, width: int) -> None:
    """A small SDXL pipeline: SDXL's block layout (2 ResNets per block, attention in the lower two
    levels, 1 and 2 transformer layers), ``width`` channels at the top, two small CLIP text encoders
    (the second with a projection), a made-up tokenizer vocabulary and a 2-level VAE."""
    import diffusers
    import transformers

    vocab_dir = folder.parent / "vocab"
    vocab_dir.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (vocab_dir / "vocab.json").write_text(json.dumps(vocab))
    (vocab_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"))
    tokenizer.model_max_length = 32

    def text(hidden: int, projection: int) -> transformers.CLIPTextConfig:
        return transformers.CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=hidden,
            intermediate_size=hidden * 4,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=32,
            projection_dim=projection,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(width, 2 * width, 4 * width),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=64 + 128,
        attention_head_dim=(4, 8, 16),
        norm_num_groups=16,
        addition_embed_type="text_time",
        addition_time_embed_dim=32,
        projection_class_embeddings_input_dim=128 + 6 * 32,
        use_linear_projection=True,
    )
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    )
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=transformers.CLIPTextModel(text(64, 64)),
        text_encoder_2=transformers.CLIPTextModelWithProjection(text(128, 128)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(steps_offset=1),
    )
    pipe.save_pretrained(str(folder))


def write_images(folder: Path, count: int, size: int) -> None:
    """``count`` squares cut from scikit-image's bundled photographs, with a caption file each and
    the ``metadata.jsonl`` diffusers' image-folder loader reads."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    lines = []
    for i in range(count):
        photo = photos[i % len(photos)]
        side = min(photo.shape[:2]) - 16 * (i // len(photos))
        crop = photo[:side, -side:] if i % 2 else photo[-side:, :side]
        name = f"{i:03d}.png"
        Image.fromarray(crop).resize((size, size)).save(folder / name)
        (folder / f"{i:03d}.txt").write_text(CAPTION)
        lines.append(json.dumps({"file_name": name, "text": CAPTION}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


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
        },
        "lora": {"targets": ["preset:unet-attention"], "rank": args.rank, "alpha": args.rank},
        "train": {
            "epochs": 1000,
            "max_steps": steps,
            "lr": args.lr,
            "warmup_steps": 0,
            "min_snr_gamma": 5.0,
            "mixed_precision": "no",
            "seed": 0,
        },
        "validation": {"prompts": []},
        "output": {"export": ["diffusers"], "merged_dtype": "fp32"},
    }


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one run of ``argv`` as its own process."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *argv], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{argv[:4]} failed:\n{done.stderr[-4000:]}")
    peak_kib = int(done.stderr.strip().splitlines()[-1])
    return seconds, peak_kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--example", required=True, type=Path, help="diffusers' train_text_to_image_lora_sdxl.py")
    parser.add_argument("--work", type=Path, default=Path("runs/sdxl-vs-diffusers"))
    parser.add_argument("--steps", type=int, nargs=2, default=[4, 24])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--width", type=int, default=64, help="UNet channels at the top level")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = args.work.resolve()
    pipeline, images = work / "pipe", work / "images"
    if not (pipeline / "model_index.json").is_file():
        build_pipeline(pipeline, args.width)
    write_images(images, args.images, args.resolution)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    env["HF_HUB_OFFLINE"] = env["HF_DATASETS_OFFLINE"] = "1"
    results: dict[str, dict[int, tuple[float, float]]] = {"visionlora": {}, "diffusers example": {}}
    for steps in args.steps:
        path = work / f"recipe-{steps}.yaml"
        path.write_text(json.dumps(recipe(pipeline, images, args, steps)))  # JSON is YAML
        out = work / f"visionlora-{steps}"
        results["visionlora"][steps] = timed(
            [sys.executable, "-m", "visionlora", "train", str(path), "--output", str(out), "--overwrite"], env
        )
        example = [
            sys.executable,
            str(args.example),
            f"--pretrained_model_name_or_path={pipeline}",
            f"--train_data_dir={images}",
            "--caption_column=text",
            f"--resolution={args.resolution}",
            "--center_crop",
            f"--train_batch_size={args.batch}",
            f"--max_train_steps={steps}",
            f"--learning_rate={args.lr}",
            "--lr_scheduler=constant",
            "--lr_warmup_steps=0",
            "--snr_gamma=5.0",
            f"--rank={args.rank}",
            "--mixed_precision=no",
            "--seed=0",
            "--dataloader_num_workers=0",
            f"--output_dir={work / f'example-{steps}'}",
        ]
        results["diffusers example"][steps] = timed(example, env)
    report(results, args, f"rank {args.rank}, {args.images} images")


def report(results: dict[str, dict[int, tuple[float, float]]], args: argparse.Namespace, setting: str) -> None:
    """Print (and with ``--json`` write) each tool's seconds per step after warm-up, end to end and peak memory."""
    a, b = args.steps
    rows = {}
    for tool, runs in results.items():
        per_step = (runs[b][0] - runs[a][0]) / (b - a)
        rows[tool] = {"seconds_per_step": per_step, "end_to_end_seconds": runs[b][0], "peak_rss_mib": runs[b][1]}
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPU threads, resolution {args.resolution}, batch {args.batch}, "
        f"{setting}, steps {a} and {b}\n"
    )
    print(f"| tool | s/step after warm-up | end to end ({b} steps) | peak memory (RSS) |")
    print("|---|---|---|---|")
    for tool, row in rows.items():
        print(
            f"| {tool} | {row['seconds_per_step']:.3f} | {row['end_to_end_seconds']:.1f} s | "
            f"{row['peak_rss_mib']:.0f} MiB |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

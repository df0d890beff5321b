"""Training LoHa/LoRA adapters for Stable Diffusion 1.x/2.x (`scripts/train_loha_sd.py`).

Modules, in import order (each imports only those above it):

* `config`: `TrainConfig`, `load_config` — the settings from TOML and flags (imports no torch).
* `step`: the diffusion objective (latents, noise, timesteps, targets, min-SNR, loss), per-sample seeds.
* `images`: the one image reader (every Pillow mode to 8-bit RGB, transparency, size limit, full decode).
* `captions`: caption files and `metadata.jsonl` read strictly (UTF-8, BOM, UTF-16), caption token counts.
* `scan`: the up-front check of the training data and its report (everything found, everything left out).
* `data`: deterministic samples, the dataset, the loader and the step schedule (re-exports the scan).
* `models`: base-model loading, adapter configs and injection, optimizer, LR schedule, weightless models.
* `plan`: the `--dry_run` plan (modules, parameters, file size, steps, warnings).
* `export`: the Kohya `.safetensors` and PEFT folder a run writes, and their training metadata.
* `checkpoint`: training-state checkpoints for resuming.
* `validation`: validation image grids and the fixed-set denoising loss.
* `tracker`: the experiment tracker (TensorBoard, wandb or none).
* `loop`: `train`, `main`, `dry_run`, `TrainResult` — the run, step by step.

This package imports none of them: `import loha_diffusion.training.config` stays free of torch.
"""

"""One training step (forward + backward + AdamW) of a full-size SD1.5 UNet with random weights:
ours vs PEFT's LoHa vs LyCORIS's LoHa vs the frozen UNet (the floor: forward + backward to the input).

Same targets for all (attention, feed-forward, proj_in/out, resnet convs; the "full" preset), r=8, effective
conv2d, fp32, batch 1. Runs interleaved in one process and prints medians and ratios. Needs ~12 GB of RAM.

    python benchmarks/bench_unet_step.py --latent 32 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import peft
import torch
from lycoris.modules.loha import LohaModule
from peft import set_peft_model_state_dict

from loha_diffusion import get_adapter_state_dict, inject_adapter
from loha_diffusion.model import adapter_layers
from loha_diffusion.targeting import unet_preset
from loha_diffusion.tiny import build_unet_from_config, full_size_unet_config


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px images)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["peft", "lycoris"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    unet = build_unet_from_config(full_size_unet_config("sd1"), device="cpu")
    unet.requires_grad_(False)
    config = unet_preset("full", r=args.rank, alpha=args.rank, use_effective_conv2d=True, init_weights=False)
    sample = torch.randn(1, 4, args.latent, args.latent)
    hidden = torch.randn(1, 77, 768)

    ours = copy.deepcopy(unet)
    inject_adapter(ours, config)
    targets = list(adapter_layers(ours))
    state = get_adapter_state_dict(ours)
    models = {"floor": unet, "ours": ours}
    if "peft" not in args.skip:
        theirs = copy.deepcopy(unet)
        kwargs = {k: v for k, v in config.to_dict().items() if k != "peft_type"}
        peft.inject_adapter_in_model(peft.LoHaConfig(**kwargs), theirs)
        set_peft_model_state_dict(theirs, state)
        models["peft"] = theirs
    if "lycoris" not in args.skip:
        lyco_unet = copy.deepcopy(unet)
        # LyCORIS's generic wrapper targets modules by class; wrap exactly our targets one by one instead.
        lyco_modules = []
        for name in targets:
            module = lyco_unet.get_submodule(name)
            lyco = LohaModule(name, module, 1.0, lora_dim=args.rank, alpha=args.rank, use_tucker=True)
            lyco.apply_to()
            with torch.no_grad():
                for key in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"):
                    if f"{name}.{key}" in state:
                        getattr(lyco, key).copy_(state[f"{name}.{key}"])
            lyco_modules.append(lyco)
        models["lycoris"] = lyco_unet
        lyco_params = [p for m in lyco_modules for p in m.parameters()]

    def params_of(name):
        if name == "lycoris":
            return lyco_params
        return [p for p in models[name].parameters() if p.requires_grad]

    optimizers = {n: torch.optim.AdamW(params_of(n), lr=1e-4) for n in models if n != "floor"}

    def step(name):
        model = models[name]
        inp = sample.detach().requires_grad_(name == "floor")
        start = time.perf_counter()
        out = model(inp, 500, hidden).sample
        out.float().square().mean().backward()
        if name in optimizers:
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    names = list(models)
    samples = {n: [] for n in names}
    for n in names:
        step(n)  # warm-up
    for i in range(args.repeats):
        for n in names[i % len(names) :] + names[: i % len(names)]:
            samples[n].append(step(n))
    medians = {n: statistics.median(v) for n, v in samples.items()}
    trainable = sum(t.numel() for t in state.values())
    print(
        f"SD1.5 UNet, latent {args.latent}, r={args.rank}, {len(targets)} adapted modules, {trainable:,} params"
    )
    print(f"torch threads {torch.get_num_threads()}, medians of {args.repeats}")
    for n in names:
        print(f"{n:<8} {medians[n]:8.2f} s   x{medians[n] / medians['floor']:.2f} floor")
    for n in ("peft", "lycoris"):
        if n in medians:
            print(f"ours/{n}: {medians['ours'] / medians[n]:.2f}")


if __name__ == "__main__":
    main()

"""What closing residual blocks does to a trained network before any step adapts to it, and whether a bias
would soften it: validation accuracy with each block's branch output replaced by zero (a closed block, as
the gates and the cut make it) and by its per-channel mean over training images (a closed block compensated
by a constant on its skip path, which would ship as one bias add).

    python -m bench.block_shock --run runs/<dense run> [--close layer1.1,layer1.2] --out docs/results/block_shock.json

Each block alone, then each `--close` set together. Blocks come from the run's traced graph; a branch must
end in a module (e.g. a batch norm) whose output holds channels on dimension 1 (N, C, ...) for it to be
replaced. Evaluated in eval mode on the run's own validation split, with the run's data settings.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from polarprune.bench import BenchError
from polarprune.bench.seeds import run_config
from polarprune.common.cli import EXIT_OK, PolarpruneError, cli_parser, fail
from polarprune.common.results import provenance, write_result
from polarprune.training.data import load_splits
from polarprune.training.data.images import normalize
from polarprune.training.graph import trace_network
from polarprune.training.mask import load_mask
from polarprune.training.networks import NetworkInfo, build_network, load_weights, read_weights

MEAN_IMAGES = 4000  # training images the branch means are taken over
REPLACEMENTS = ("zero", "mean")


def branch_modules(network: torch.nn.Module, info: NetworkInfo) -> dict[str, torch.nn.Module]:
    """Block name -> the module whose output is the block's branch output."""
    graph = trace_network(network, info.example_input())
    nodes = {node.name: node for node in graph.module.graph.nodes}
    modules = dict(network.named_modules())
    out = {}
    for name, block in graph.blocks.items():
        node = nodes[block.branch_output]
        if node.op != "call_module" or node.target not in modules:
            raise BenchError(f"block {name}: its branch ends in {node.op} {node.target}, not a module; "
                             "this benchmark replaces a module's output")
        out[name] = modules[node.target]
    return out


@torch.no_grad()
def measure(run: Path, close_sets: list[list[str]]) -> dict:
    folder, path = run, run / "metrics.json"
    if not path.is_file():
        raise BenchError(f"{path} not found: --run must name a finished run folder")
    metrics = json.loads(path.read_text())
    config = run_config(folder, metrics)
    document, _ = load_mask(folder / "mask.json")
    info = NetworkInfo.from_dict(document["network"])
    network = build_network(info)
    load_weights(network, read_weights(folder / "checkpoint.pt"), str(folder / "checkpoint.pt"))
    network.eval()
    branches = branch_modules(network, info)
    unknown = sorted({b for chosen in close_sets for b in chosen} - set(branches))
    if unknown:
        raise BenchError(f"--close names {unknown}, not blocks of this network ({', '.join(branches)})")
    data, train, val, _ = load_splits(config["dataset"], config.get("data_dir"), config.get("train_subset"),
                                      config.get("val_size", 2000), config.get("seed", 0))
    images, labels = normalize(val.images, data), val.labels

    means: dict[str, torch.Tensor] = {}
    def record_mean(module, inputs, output, name):  # per channel, over the batch and every other dimension
        means[name] = output.mean([0, *range(2, output.dim())])

    hooks = [module.register_forward_hook(lambda m, i, o, name=name: record_mean(m, i, o, name))
             for name, module in branches.items()]
    network(normalize(train.images[:MEAN_IMAGES], data))
    for hook in hooks:
        hook.remove()

    replaced: dict[str, str] = {}  # block -> how its branch output is replaced while evaluating

    def replace(module, inputs, output, name):
        if name not in replaced:
            return output
        value = torch.zeros_like(means[name]) if replaced[name] == "zero" else means[name]
        return value.view(1, -1, *([1] * (output.dim() - 2))).expand_as(output)

    for name, module in branches.items():
        module.register_forward_hook(lambda m, i, o, name=name: replace(m, i, o, name))

    def accuracy() -> float:
        correct = sum(int((network(images[i:i + 500]).argmax(1) == labels[i:i + 500]).sum())
                      for i in range(0, len(labels), 500))
        return correct / len(labels)

    def closed(blocks: list[str]) -> dict:
        row = {"blocks": blocks}
        for how in REPLACEMENTS:
            replaced.clear()
            replaced.update({block: how for block in blocks})
            row[how] = accuracy()
        replaced.clear()
        return row

    return {"run": str(run), "val_images": len(labels), "mean_images": min(MEAN_IMAGES, len(train)),
            "intact_val_accuracy": accuracy(),
            "single": [closed([name]) for name in branches], "sets": [closed(chosen) for chosen in close_sets]}


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser("python -m bench.block_shock", __doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run folder (e.g. a dense run)")
    parser.add_argument("--close", action="append", default=[], metavar="BLOCK,BLOCK",
                        help="blocks closed together (repeat for several sets)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=Path("docs/results/block_shock.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        result = measure(args.run, [[b.strip() for b in text.split(",") if b.strip()] for text in args.close])
    except (PolarpruneError, KeyError, ValueError) as error:
        return fail("python -m bench.block_shock",
                    error if isinstance(error, PolarpruneError) else BenchError(str(error)))
    write_result(args.out, result, {"python -m bench.block_shock": provenance()})
    print(f"nothing closed: {result['intact_val_accuracy']:.4f} validation accuracy")
    for row in result["single"] + result["sets"]:
        print(f"{','.join(row['blocks'])}: " + ", ".join(f"{how} {row[how]:.4f}" for how in REPLACEMENTS))
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())

"""One full MeanFlow distillation step in JAX against the paper's PyTorch (issue 8), CPU.

The MeanFlow run of benchmarks/scm_vs_torch.py (its docstring describes both sides):

    .venv/bin/python benchmarks/meanflow_vs_torch.py [--repeats 3] [--attn-impl auto|xla]
        [--jvp-attn-impl blockwise|xla]
"""

from scm_vs_torch import main  # noqa: E402

if __name__ == "__main__":
    main("meanflow")

"""gpt2exp: Hydra-configured GPT-2 experiments whose training runs are never lost.

python -m gpt2exp.train                          # the embedded Shakespeare default
python -m gpt2exp.train +experiment=shakespeare_small
python -m gpt2exp.train resume=outputs/<date>/<time>
python -m gpt2exp.generate outputs/<date>/<time> --prompt "ROMEO:"
"""

__version__ = "0.1.0"

"""Convert a Hugging Face Llama folder or a GGUF file into a swiftkv-jax checkpoint folder.

    python conversion/convert_hf.py SOURCE OUT [--hf] [--num-key-value-layers L --group-size g]

Same as `swiftkv-jax convert`; the output folder holds config.json, the orbax params and the
tokenizer files, and is written atomically.
"""

import sys

from swiftkv_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))

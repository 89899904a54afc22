"""The ``transformers`` harness: PyTorch + Hugging Face transformers, in-process."""

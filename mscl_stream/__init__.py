"""mscl_stream: GPU streaming loader and trainer for MSCL video pretraining with on-the-fly flow."""

__version__ = "0.1.0"

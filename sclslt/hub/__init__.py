"""A trained model outside its run directory: the Hugging Face model folder (`export`), the model class that
loads it by path or Hub name (`model.SignTranslator`), and its model card (`card`)."""
from sclslt.hub.model import ExportError, SignTranslator

__all__ = ["SignTranslator", "ExportError"]

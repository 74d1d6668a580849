"""A run's trained model as files people's tools load, and text generated from them.

- :mod:`~gtbus.export.layout`: tensor names and layouts per trainer; the trainer an export builds again.
- :mod:`~gtbus.export.digest`: the model digest from an export's files, as the run's device measured it.
- :mod:`~gtbus.export.llmc`: llm.c's GPT-2 checkpoint format, written and read.
- :mod:`~gtbus.export.model_files`: ``export_model`` (safetensors, config.json, llm.c) and reading an export back.
- :mod:`~gtbus.export.sample`: bytes generated from an exported model.
"""

from gtbus.export.model_files import ExportedModel, LoadedExport, export_model, export_trainer, load_export, model_digest_of

__all__ = ["ExportedModel", "LoadedExport", "export_model", "export_trainer", "load_export", "model_digest_of"]

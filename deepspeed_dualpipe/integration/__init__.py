"""The ways into the plugin from a DeepSpeed job: ``initialize``/``install``, the recording of
``PipelineModule`` arguments, and the conversion of a user's module into chunks."""

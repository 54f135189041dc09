"""The demo job: a small DeepSeek-V3-style MoE language model trained with a pipeline schedule.

- :mod:`~deepspeed_dualpipe.tools.lm.data`: the corpus (``pydoc_data.topics``), byte-level, split and batched;
- :mod:`~deepspeed_dualpipe.tools.lm.model`: the model as DeepSpeed ``LayerSpec``\\ s;
- :mod:`~deepspeed_dualpipe.tools.lm.train`: the training loop, run by ``examples/train_moe_lm.py``;
- :mod:`~deepspeed_dualpipe.tools.lm.timeline`: a measured step as a picture and a Chrome trace;
- :mod:`~deepspeed_dualpipe.tools.lm.launch`: ``deepspeed`` launcher wrapper used by ``make demo`` and the tests;
- :mod:`~deepspeed_dualpipe.tools.lm.config_files`: configs that extend a ``base`` config;
- :mod:`~deepspeed_dualpipe.tools.lm.ablate`: ``python -m deepspeed_dualpipe ablate``, one run per config, a table and a plot.
"""

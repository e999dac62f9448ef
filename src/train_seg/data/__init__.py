"""Datasets and what feeds them to the loop: ``base`` (``SegmentationDataset``: the sample contract, per-sample
seeded augmentation, the class-aware crop), one module per on-disk layout (``synthetic``, ``voc``, ``cityscapes``,
``ade20k``, ``folder``), ``class_stats`` (pixel and image counts per class, cached), ``sampler`` (repeat-factor
sampling), ``order`` (an epoch's order as a pure function of seed, epoch and position) and ``transforms``
(building the albumentations pipelines of a config). Nothing is imported here: import the module you need."""

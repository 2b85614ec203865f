"""Training SSDD autoencoders (``pip install 'ssdd-diffusers[training]'``).

* :mod:`.objective`: the loss of a batch (flow matching, LPIPS, REPA, KL; distillation);
* :mod:`.multiscale`: multi-scale training and per-scale distillation;
* :mod:`.losses`: the individual loss terms;
* :mod:`.optim`, :mod:`.ema`: optimiser, schedule-free switch, EMA;
* :mod:`.reproducibility`: randomness as a function of ``(seed, step, ...)`` for exact resume;
* :mod:`.checkpoints`, :mod:`.hub`: atomic checkpoints, Hub upload;
* :mod:`.arguments`, :mod:`.model_loading`, :mod:`.validation`, :mod:`.trainer`: the training loop that
  ``training/train_ssdd.py``, ``training/distill_ssdd.py`` and the quickstart run.
"""

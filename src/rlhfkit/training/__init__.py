"""The one training core every trainer uses: ``options`` (shared config pieces), ``run``
(start, checkpoint, finish), ``step`` (one optimizer step with its finite checks),
``cadence`` (when to log, evaluate and save) and ``optim`` (AdamW and its schedule)."""

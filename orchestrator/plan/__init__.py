"""Pure decisions over plain data: batches and schedule (:mod:`.batches`), resources and placement
(:mod:`.placement`), memory per device (:mod:`.memory`), a search's outcomes and study plan (:mod:`.search`), and
the promotion gate (:mod:`.promotion`). Imports no torch, Ray, MLflow, DeepSpeed or transformers."""

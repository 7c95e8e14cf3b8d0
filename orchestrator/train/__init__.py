"""The worker side: the training loop (:mod:`.loop`), tasks and data readers, model builders, the in-process
session, and the imports a Ray worker starts early (:mod:`.warmup`). Never imports Ray or MLflow."""

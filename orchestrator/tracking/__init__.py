"""The only code that imports MLflow: worker sinks (:mod:`.sinks`), runs (:mod:`.runs`) and the model registry
(:mod:`.registry`)."""

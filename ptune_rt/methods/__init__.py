"""One package per PEFT method (config, modules, how it goes into and out of a model, report rows,
checkpoint handler, and its registry entry ``METHOD``); ``ptune_rt.registry`` lists them. Methods
do not import each other: what two share lives below them (``ptune_rt.targets``, ``heads``,
``task_modules``, ``param_subset``, ``io.common``)."""

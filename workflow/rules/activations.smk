# Sharded like generate: one model load per job. None when generation captures the activations.
for name, roles in [] if PLAN.jobs.captures_activations else PLAN.jobs.groups("activations"):

    rule:
        name:
            name
        input:
            model="results/{model}/model.json",
            responses=PLAN.jobs.outputs("results/{model}/responses/{role}.parquet", roles),
        output:
            activations=PLAN.jobs.outputs("results/{model}/activations/{role}.safetensors", roles),
        params:
            layers=config["activations"]["layers"],
            dtype=config["activations"]["dtype"],
            compute_dtype=config["model"]["dtype"],
            batch_tokens=config["activations"]["batch_tokens"],
            blocks=config["model"]["blocks"],
            trust_remote_code=config["model"]["trust_remote_code"],
            template_options=config["model"]["chat_template_kwargs"],
            **PLAN.params.activations_backend(),
        threads: PLAN.jobs.threads("activations", 2)
        resources:
            **PLAN.jobs.resources("activations"),
        conda:
            "../envs/assistant-axis.yaml"
        log:
            f"logs/{{model}}/{name}.log" if roles else "logs/{model}/activations/{role}.log",
        script:
            "../scripts/activations.py"

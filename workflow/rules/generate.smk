# One rule with a {role} wildcard, or, with `shards: N`, one rule per shard that loads the model
# once for all of its roles (see Jobs.groups in assistant_axis/plan/jobs.py).
for name, roles in PLAN.jobs.groups("generate"):

    rule:
        name:
            name
        input:
            model="results/{model}/model.json",
        output:
            responses=PLAN.jobs.outputs("results/{model}/responses/{role}.parquet", roles),
            # generate.capture_activations: generation writes the activations (no activations jobs).
            **PLAN.params.captured_outputs(roles),
        params:
            jobs=lambda wc, roles=roles: PLAN.params.generate_jobs(roles or [wc.role]),
            questions=PLAN.params.questions(),
            backend=config["generate"]["backend"],
            settings=PLAN.params.generate(),
            dtype=config["model"]["dtype"],
            trust_remote_code=config["model"]["trust_remote_code"],
            template_options=config["model"]["chat_template_kwargs"],
            **PLAN.params.capture(),
        threads: PLAN.jobs.threads("generate", 2)
        resources:
            **PLAN.jobs.resources("generate"),
        conda:
            "../envs/assistant-axis.yaml"
        log:
            f"logs/{{model}}/{name}.log" if roles else "logs/{model}/generate/{role}.log",
        script:
            "../scripts/generate.py"

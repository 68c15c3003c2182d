# One rule with a {role} wildcard, or, with `shards: N`, one rule per shard that loads the model
# once for all of its roles (see Plan.job_groups).
for name, roles in PLAN.job_groups("generate"):

    rule:
        name:
            name
        input:
            model="results/{model}/model.json",
        output:
            responses=PLAN.outputs("results/{model}/responses/{role}.parquet", roles),
        params:
            jobs=lambda wc, roles=roles: PLAN.generate_jobs(roles or [wc.role]),
            questions=PLAN.question_params(),
            backend=config["generate"]["backend"],
            settings=PLAN.generate_settings(),
            dtype=config["model"]["dtype"],
            trust_remote_code=config["model"]["trust_remote_code"],
            template_options=config["model"]["chat_template_kwargs"],
        threads: PLAN.threads("generate", 2)
        resources:
            **PLAN.resources("generate"),
        conda:
            "../envs/assistant-axis.yaml"
        log:
            f"logs/{{model}}/{name}.log" if roles else "logs/{model}/generate/{role}.log",
        script:
            "../scripts/generate.py"

rule activations:
    input:
        model="results/{model}/model.json",
        responses="results/{model}/responses/{role}.parquet",
    output:
        activations="results/{model}/activations/{role}.safetensors",
    params:
        layers=config["activations"]["layers"],
        dtype=config["activations"]["dtype"],
        compute_dtype=config["model"]["dtype"],
        batch_tokens=config["activations"]["batch_tokens"],
        blocks=config["model"]["blocks"],
    threads: 2
    conda:
        "../../environment.yml"
    log:
        "logs/{model}/activations/{role}.log",
    script:
        "../scripts/activations.py"

"""How Tandem runs on clusters: configuration files, and offline checks of them.

Files (paths relative to the repo root):

- ``cluster/runtime_env.yaml``: Ray runtime env for the GPU path (``ray job submit --working-dir .
  --runtime-env cluster/runtime_env.yaml -- python -m engine run --config ...``): pip pins equal
  to pyproject.toml's, shared-filesystem env vars, upload excludes.
- ``cluster/runtime_env.local.yaml``: the same for a local CPU Ray started from the repo's venv
  (no ``pip:``: the venv already has the packages).
- ``cluster/configs/*.yaml``: run configs for ``engine.config.load_yaml``: ``iris_local`` (the
  embedded default), ``gsm8k_llama3_8b`` (8 GPUs, ``relaunch``), ``hotpotqa_mistral_7b``
  (4 serving + 4 training GPUs, ``hotswap``).
- ``cluster/kuberay/rayjob.yaml``: a KubeRay RayJob running the GSM8K config on a fresh cluster.
- ``cluster/kuberay/rayservice.yaml``: a KubeRay RayService serving a finished run dir
  (``serve.app:app``).
- ``cluster/launcher/aws.yaml``: a Ray cluster-launcher config (``ray up``) for AWS.
- ``cluster/manifests.py``: validators for the runtime envs, KubeRay manifests and launcher YAML.
- ``cluster/engine_args.py``: vLLM engine-arg names, to check a config's ``engine_kwargs``.

Nothing here starts Ray or imports Tandem's other packages.
"""

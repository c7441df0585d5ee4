"""How Tandem runs on clusters: ray job submit entry, runtime_env, KubeRay manifests."""

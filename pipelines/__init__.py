"""unclip.pipelines: config, Dagster assets, command line."""

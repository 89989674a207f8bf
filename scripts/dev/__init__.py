"""Developer tools: the configuration reference's generator, the architecture report and the GPU check's probes."""

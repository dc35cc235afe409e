"""dsmoe-plan's models: parameters and FLOPs (params), activation memory per layer
(activations) and per GPU (memory), step time (step_time), GPUs (hardware), one layout on one
cluster (estimate), the layout search (search), and the saved-activation measurement that checks
the activation model (measure)."""

"""The GenRecal method and its training loop: Recalibrator, losses, teacher features, stages,
checkpoints, placement. It never imports the offline tiny world (`genrecal_cli.world`)."""

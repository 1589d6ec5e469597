"""Around the labeling job: ImageNet ground truth and accuracy, model costs, run reports and run listings."""

#!/usr/bin/env python
"""Draw Selfie's pretext task as a pretraining checkpoint does it: one figure an image.

    python run_visualization.py --model_name_or_path outputs/selfie-cifar10 --dataset_name uoft-cs/cifar10 \\
        --output_dir outputs/selfie-cifar10-pretext --num_images 8

For each validation image (drawn with --split_seed, which draws its mask too): the image with its hidden patches
outlined, the candidate patches, and the patch the model picks in each hidden position with its probability, green
where it is the position's own patch and red where it is another; under the split objective, both directions.
Writes pretext_task_<i>.png into --output_dir. With no dataset it draws scikit-learn's handwritten digits.
`--help` lists the flags; a JSON file of them works as well. Runs on one process, on the GPU where there is one.
"""

from selfie_training.pretext_visualization import main
from selfie_training.runner import run


if __name__ == "__main__":
    run(main)

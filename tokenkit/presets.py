"""Named recipes: plain dicts of CLI option values, applied before explicit flags."""

# The paper's k-CLIP (MaPeT, arXiv 2306.07346, Sec. 3.3 and the official code): OpenAI CLIP RN50x64 at
# 448 px, last ResNet stage before attention pooling (14x14 x 4096), K 8192, L2, 20 iterations, best of 5,
# 512 points per centroid, ~4.2M sampled patch features.
PRESETS = {
    "mapet-kclip": {
        "model": "RN50x64",
        "pretrained": "openai",
        "grid": 14,  # the input size follows from the grid: 14 x RN50x64's stride 32 = 448 px
        "layer": -1,
        "max_patches": 4_194_304,
        "k": 8192,
        "niter": 20,
        "nredo": 5,
        "metric": "l2",
        "max_points_per_centroid": 512,
    },
}

"""Images in: data sets (Fashion-MNIST, class folders), image files and their checks, pixel transforms and
augmentation, and a synthetic class folder of shapes."""

from elmgen.data.datasets import (
    DataConfig,
    FashionMNIST,
    ImageDataset,
    ImageFolder,
    Subset,
    absolute_source,
    load_dataset,
    pick_images,
    read_idx,
)
from elmgen.data.images import (
    IMAGE_SUFFIXES,
    BadImage,
    center_crop_resize,
    check_images,
    folder_images,
    image_array,
    inspect_folder,
    load_pixels,
    open_image,
)
from elmgen.data.transforms import crop_source_size, random_blur, random_hflip, random_shift, to_float, to_uint8

"""The label value every layer agrees means "no label here"; no imports, so any module may use it."""

# Masks are uint8 with train ids below it; 255 is also what Cityscapes' id -1 becomes in a uint8
# mask. Loss, metrics and augmentation padding all skip pixels holding it.
IGNORE_INDEX = 255

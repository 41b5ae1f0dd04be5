"""The label value every dataset, transform, loss and metric here shares."""

#: Pixels of no class: PASCAL VOC's object outlines and unlabelled regions, the synthetic set's
#: optional boundary band, the padding of crops and of batches. Losses and metrics ignore them.
VOID = 255

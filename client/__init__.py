"""Python client for pitchkeras.v1.ReviewService (installed as `pitchkeras.client`).

Importing this package never imports TensorFlow or Keras (only grpcio,
protobuf and the store's record type), so a client script starts in well
under a second.

Modules: `review_client` (`ReviewClient`, `GeneratedReview`), `convert` (store record <-> `v1.Review`).

Example:

    from pitchkeras.client import ReviewClient

    with ReviewClient("127.0.0.1:50051") as client:
        review = client.get_review(score=8.0, genre="Rap")
        print(review.id, review.text)
        same = client.get_by_id(review.id)
"""

from pitchkeras.client.review_client import (
    DEFAULT_TARGET,
    GeneratedReview,
    ReviewClient,
    ServiceError,
)

__all__ = ["DEFAULT_TARGET", "GeneratedReview", "ReviewClient", "ServiceError"]

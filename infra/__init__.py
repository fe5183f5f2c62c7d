"""What the cloud side needs: the S3 bucket the jobs use and the IAM policy of the cluster's role (see README.md)."""

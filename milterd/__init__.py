"""milterd: DKIM signing and DKIM/SPF/DMARC checks for stock Postfix, as a milter."""
